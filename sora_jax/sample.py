r"""Sampling: restore the EMA parameters of a workdir, integrate the flow with guidance, write videos.

  python -m sora_jax.sample --workdir=runs/shapes --prompt="a red circle moving right" --out=red.mp4

From a notebook:
  model = sample.load('runs/shapes')
  videos = sample.generate(model, ['a red circle moving right'], seed=0)   # uint8 [b, T, H, W, 3]
"""

import dataclasses
import json
import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from sora_jax import UsageError, checkpoint, ensure_writable_dir, sharding, video
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.models import autoencoder as autoencoder_lib
from sora_jax.models import dit
import sora_jax.text as text_lib
from sora_jax.text import byte as text


@dataclasses.dataclass
class Model:
  """What sampling needs: the config, the DiT's graph and (EMA) parameters, the autoencoder, and
  the frozen text encoder (None: the DiT's own byte encoder)."""
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: dict
  autoencoder: object
  step: int = 0
  text_encoder: object = None


@partial(jax.jit, static_argnames=('graphdef', 'num_steps', 'prediction', 'stochasticity'))
def _sample_latents(params, graphdef, noise, cond, null_cond, guidance_scale, time_shift, rng_b, *,
                    num_steps: int, prediction: str, stochasticity: float):
  net = nnx.merge(graphdef, params)

  def velocity(x, t_b, cond):
    # The exact v = (x_t - x0) / t: the last Euler step then lands on x0.
    return rf.to_velocity(net(x, t_b, **cond), x, t_b, prediction_type=prediction)

  fn = rf.guided(velocity, cond, null_cond, guidance_scale)
  return rf.sample(fn, noise, num_steps=num_steps, shift=time_shift, stochasticity=stochasticity, rng_b=rng_b)


def conditioning(config, prompts: list, text_encoder=None, negative_prompt: str | None = None) -> tuple[dict, dict]:
  """The DiT keywords for `prompts` and for the unconditional branch of guidance.

  Text models take captions; the unconditional branch sees the empty caption, as the dropped
  captions of training did, or `negative_prompt`, which guidance then steers away from. With a
  frozen `text_encoder` (T5) the keywords are its embeddings. Class-conditional models take class
  indices (ints, or strings of digits from a command line; the null class is `config.model.num_classes`).
  """
  if dit.is_class_conditional(config.model):
    if negative_prompt is not None:
      raise UsageError('a class-conditional model takes no negative prompt')
    n = config.model.num_classes
    try:
      labels = [int(p) for p in prompts]
    except ValueError:
      raise UsageError(f'prompts {prompts}: a class-conditional model takes class indices in [0, {n})') from None
    if not all(0 <= label < n for label in labels):
      raise UsageError(f'class labels {labels}: use indices in [0, {n})')
    return (dict(labels_b=np.asarray(labels, np.int32)), dict(labels_b=np.full(len(labels), n, np.int32)))
  prompts = [str(p) for p in prompts]
  negative = [negative_prompt or ''] * len(prompts)
  if text_encoder is not None:
    (text_bld, mask_bl), (null_bld, null_mask_bl) = text_encoder.encode(prompts), text_encoder.encode(negative)
    return dict(text_bld=text_bld, text_mask_bl=mask_bl), dict(text_bld=null_bld, text_mask_bl=null_mask_bl)
  if text_lib.is_frozen(config):
    raise UsageError(f'config.text_encoder.kind={config.text_encoder.kind!r}: pass the loaded text encoder')
  tokens, mask = text.tokenize(prompts, config.data.max_text_len)
  null_tokens, null_mask = text.tokenize(negative, config.data.max_text_len)
  return dict(tokens_bl=tokens, token_mask_bl=mask), dict(tokens_bl=null_tokens, token_mask_bl=null_mask)


def generate(model: Model, prompts: list, *, seed: int = 0, num_steps: int | None = None,
             guidance_scale: float | None = None, time_shift: float | None = None,
             stochasticity: float | None = None, negative_prompt: str | None = None) -> np.ndarray:
  """uint8 videos [len(prompts), T, H, W, 3]; unset options come from `config.sample`.

  `prompts` are captions, or class indices for a class-conditional model. `negative_prompt`
  replaces the empty caption in the unconditional branch of guidance (see `conditioning`).
  """
  cfg = model.config
  num_steps = num_steps or cfg.sample.num_steps
  guidance_scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
  time_shift = cfg.sample.time_shift if time_shift is None else time_shift
  if stochasticity is None:
    stochasticity = cfg.sample.get('stochasticity', 0.0)  # workdirs from before the option: 0
  if num_steps < 1:
    raise UsageError(f'steps={num_steps}: need at least one sampling step')
  if not 0 <= stochasticity <= 1:
    raise UsageError(f'stochasticity={stochasticity}: use a value in [0, 1]')
  cond, null_cond = conditioning(cfg, list(prompts), model.text_encoder, negative_prompt)
  shape = model.autoencoder.latent_shape(cfg.data.frames, cfg.data.height, cfg.data.width)
  key, sde_key = jax.random.split(jax.random.key(seed))
  # One noise per prompt index, so a prompt's video does not depend on the batch around it.
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (*shape, model.autoencoder.channels)))(
      jnp.arange(len(prompts)))
  rng_b = jax.vmap(lambda i: jax.random.fold_in(sde_key, i))(jnp.arange(len(prompts)))
  latents = _sample_latents(model.params, model.graphdef, noise, cond, null_cond, guidance_scale, time_shift,
                            rng_b, num_steps=num_steps, prediction=cfg.objective.prediction,
                            stochasticity=float(stochasticity))
  return video.to_uint8(jax.device_get(_decode(model.autoencoder, model.autoencoder.params, latents)))


@partial(jax.jit, static_argnums=0)
def _decode(autoencoder, params, latents):
  return autoencoder.decode(params, latents)


def abstract_model(config):
  """The DiT's graph and abstract parameters (no memory) for a config, and its autoencoder with
  abstract parameters (shapes: `autoencoder.make(..., load_weights=False)`)."""
  ae = autoencoder_lib.make(config.autoencoder, load_weights=False)
  text_dim = text_lib.text_dim(config)
  abstract = nnx.eval_shape(lambda: dit.from_config(config.model, ae.channels, nnx.Rngs(0), text_dim))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  return graphdef, abstract_params, ae


def load(workdir: str, step: int | None = None) -> Model:
  """Restores the EMA parameters of `workdir`, sharded (FSDP) over the local devices."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise UsageError(f'{config_path} not found: is --workdir a training workdir?')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mngr = checkpoint.manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise UsageError(f'no checkpoint{"" if step is None else f" at step {step}"} in {workdir}/checkpoints')
  graphdef, abstract_params, _ = abstract_model(config)
  ae = autoencoder_lib.make(config.autoencoder)
  mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1, sequence=1))
  specs = nnx.get_partition_spec(abstract_params).to_pure_dict()
  pure = abstract_params.to_pure_dict()
  shardings = sharding.logical_to_shardings(specs, pure, mesh, config.sharding_rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shardings)
  params = checkpoint.restore_ema(mngr, step, target)
  mngr.close()
  text_encoder = text_lib.from_config(config, mesh, sharding.rules_tuple(config.sharding_rules))
  return Model(config, graphdef, params, ae, step, text_encoder)


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  """Defined on demand, so that importing this module (as train.py does) defines no flags."""
  flags.DEFINE_string('workdir', None, 'Training workdir to sample from.')
  flags.DEFINE_multi_string('prompt', None, 'Text prompt (a class index for a class-conditional model); '
                            'repeat for several videos.')
  flags.DEFINE_string('out', 'sample.mp4', 'Output .mp4 or .gif; with several prompts, _0, _1, ... '
                      'are inserted before the suffix.')
  flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance scale (default: config).')
  flags.DEFINE_integer('steps', None, 'Sampling steps (default: config).')
  flags.DEFINE_float('stochasticity', None, 'Share of fresh noise per step, 0 (deterministic flow) to 1 '
                     '(default: config).')
  flags.DEFINE_string('negative_prompt', None, 'What guidance steers away from (text models; default: '
                      'the empty caption).')
  flags.DEFINE_integer('seed', 0, 'Noise seed.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step to use (default: latest).')
  flags.DEFINE_integer('upscale', 1, 'Repeat pixels this many times in the written video.')


def output_paths(out: str, count: int) -> list[str]:
  """The video paths for `count` prompts, checked writable before any sampling is done."""
  root, suffix = os.path.splitext(out)
  if suffix.lower() not in video.SUFFIXES:
    raise UsageError(f'--out={out}: use a .mp4 or .gif file name')
  ensure_writable_dir(os.path.dirname(os.path.abspath(out)), f'--out={out}')
  return [out] if count == 1 else [f'{root}_{i}{suffix}' for i in range(count)]


def main(argv):
  del argv
  try:
    if not FLAGS.workdir or not FLAGS.prompt:
      raise UsageError('--workdir and --prompt are required')
    paths = output_paths(FLAGS.out, len(FLAGS.prompt))
    model = load(FLAGS.workdir, FLAGS.checkpoint_step)
    videos = generate(model, FLAGS.prompt, seed=FLAGS.seed, num_steps=FLAGS.steps,
                      guidance_scale=FLAGS.guidance_scale, stochasticity=FLAGS.stochasticity,
                      negative_prompt=FLAGS.negative_prompt)
    for prompt, path, v in zip(FLAGS.prompt, paths, videos):
      try:
        video.write(path, v, fps=model.config.sample.fps, upscale=FLAGS.upscale)
      except OSError as e:
        raise UsageError(f'cannot write {path}: {e.strerror or e}') from None
      print(f'{path}: "{prompt}" (step {model.step})')
  except UsageError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
