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
from absl import app, flags
from flax import nnx

from sora_jax import UsageError, checkpoint, ensure_writable_dir, init_devices, quiet_library_logs, sharding, video
from sora_jax.data import packing
from sora_jax.diffusion import frame_conditioning as fc
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


EDIT_METHODS = ('sdedit', 'flowedit')


@partial(jax.jit, static_argnames=('graphdef', 'num_steps', 'prediction', 'stochasticity', 'frame_guidance',
                                   'reconstruction'))
def _sample_latents(params, graphdef, noise, start, cond, null_cond, guidance_scale, time_shift, rng_b,
                    given=None, frame_guidance_scale=1.0, reconstruction_scale=0.0, *, num_steps: int,
                    prediction: str, stochasticity: float, t_start=1.0, frame_guidance: bool = False,
                    reconstruction: bool = False):
  """Latents [b, T, H, W, c] integrated from `start` (the noise, or for SDEdit the input at t_start).

  One batched call per step evaluates the guidance branches (`rf.guidance`): text and null caption,
  both seeing the given frames (`given`: `x` the clean latents, `mask_bt`), and with
  `frame_guidance` the null caption without them. The given frames follow their own path
  (1 - t) x + t noise and come back exactly. With `reconstruction`, reconstruction guidance
  (`rf.reconstruction_correction`, one more forward and backward pass a step) of `reconstruction_scale`.
  """
  net = nnx.merge(graphdef, params)
  if given is None:
    branches = [(cond, False), (null_cond, False)]
  elif frame_guidance:
    branches = [(cond, True), (null_cond, True), (null_cond, False)]
  else:
    branches = [(cond, True), (null_cond, True)]
  conds = jax.tree.map(lambda *a: jnp.concatenate(a), *[c for c, _ in branches])

  def velocity(x, t_b):
    xs, extra = [], {}
    if given is not None:
      zeros = jnp.zeros_like(given['mask_bt'])
      xs = [fc.apply_to_input(x, given['x'], given['mask_bt']) if use else x for _, use in branches]
      extra['frame_mask_bt'] = jnp.concatenate([given['mask_bt'] if use else zeros for _, use in branches])
    else:
      xs = [x] * len(branches)
    xs, ts = jnp.concatenate(xs), jnp.concatenate([t_b] * len(branches))
    # The exact v = (x_t - x0) / t: the last Euler step then lands on x0.
    v = rf.to_velocity(net(xs, ts, **conds, **extra), xs, ts, prediction_type=prediction)
    v = jnp.split(v, len(branches))
    out = rf.guidance(v[0], v[1], guidance_scale, v[2] if frame_guidance else None, frame_guidance_scale)
    if reconstruction:  # the clean estimate x - t v moves by -correction, so v by +correction / t
      t = t_b.reshape((-1,) + (1,) * (x.ndim - 1))
      x_path = fc.apply_to_input(x, rf.interpolate(given['x'], noise, t_b), given['mask_bt'])
      no_frames = jnp.zeros_like(given['mask_bt'])
      x0_fn = lambda z: z - t * rf.to_velocity(net(z, t_b, **cond, frame_mask_bt=no_frames), z, t_b,
                                               prediction_type=prediction)
      out = out + rf.reconstruction_correction(x0_fn, x_path, given['x'], given['mask_bt'], t_b,
                                               reconstruction_scale) / jnp.maximum(t, 1e-6)
    if given is not None:  # given frames stay on their noising path
      out = fc.apply_to_input(out, noise - given['x'], given['mask_bt'])
    return out

  x = rf.sample(velocity, start, num_steps=num_steps, shift=time_shift, t_start=t_start,
                stochasticity=stochasticity, rng_b=rng_b)
  return x if given is None else fc.apply_to_input(x, given['x'], given['mask_bt'])


@partial(jax.jit, static_argnames=('graphdef', 'num_steps', 'prediction', 'noise_draws'))
def _flow_edit_latents(params, graphdef, x_src, cond, null_cond, source_cond, guidance_scale, time_shift, rng_b,
                       t_start, *, num_steps: int, prediction: str, noise_draws: int):
  """FlowEdit of the latents x_src [b, T, H, W, c] (`rf.flow_edit`): the target velocity guided
  toward `cond` (against `null_cond`), the source velocity under `source_cond`, one batched call a
  step for all its noise draws."""
  net = nnx.merge(graphdef, params)

  def velocities(z_tar, z_src, t_b):  # z: the noise draws' batches one after another
    draws = z_tar.shape[0] // x_src.shape[0]
    conds = jax.tree.map(lambda *a: jnp.concatenate([c for c in a for _ in range(draws)]), cond, null_cond, source_cond)
    xs, ts = jnp.concatenate([z_tar, z_tar, z_src]), jnp.concatenate([t_b] * 3)
    v_text, v_null, v_src = jnp.split(rf.to_velocity(net(xs, ts, **conds), xs, ts, prediction_type=prediction), 3)
    return rf.guidance(v_text, v_null, guidance_scale), v_src

  return rf.flow_edit(velocities, x_src, num_steps=num_steps, t_start=t_start, shift=time_shift, rng=rng_b,
                      noise_draws=noise_draws)


def check_size(config, autoencoder, frames: int, height: int, width: int,
               names=('config.data.frames', 'config.data.height', 'config.data.width'),
               sampling: bool = False) -> tuple[int, int, int]:
  """The latent (T, H, W) of a clip of this size, or a one-line UsageError naming the field (`names`)
  that the autoencoder or the patch does not divide, or (`sampling`) a size over `config.sample.max_tokens`."""
  sizes = (frames, height, width)
  prefix = os.path.commonprefix(list(names)).rpartition('.')[0]  # 'config.data.frames/height/width'
  label = prefix + '.' + '/'.join(n[len(prefix) + 1:] for n in names) if prefix else '/'.join(names)
  for name, n in zip(names, sizes):
    if not isinstance(n, (int, np.integer)) or n < 1:
      raise UsageError(f'{name}={n!r}: must be a positive integer')
  try:
    latent_thw = autoencoder.latent_shape(*sizes)
  except ValueError as e:
    raise UsageError(f'{label}={frames}x{height}x{width} do not fit config.autoencoder.kind='
                     f'{config.autoencoder.kind!r}: {e}') from None
  patch = tuple(config.model.patch)
  for i, (name, n, latent, p) in enumerate(zip(names, sizes, latent_thw, patch)):
    if i == 0 and latent == 1 and p > 0:
      continue  # an image: a still clip of the temporal patch (dit.still_frames)
    if p <= 0 or latent % p:
      via = '' if latent == n else f' (latent {name.rsplit(".", 1)[-1].lstrip("-")} {latent})'
      raise UsageError(f'config.model.patch={patch} does not divide {name}={n}{via}')
  tokens = packing.tokens_of(latent_thw, patch)
  limit = config.sample.get('max_tokens') if sampling else None
  if limit and tokens > limit:
    raise UsageError(f'{frames}x{height}x{width} is {tokens} spacetime patches, more than config.sample.max_tokens='
                     f'{limit} ({label})')
  return latent_thw


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
             stochasticity: float | None = None, negative_prompt: str | None = None,
             given=None, given_mask=None, frame_guidance_scale: float | None = None,
             reconstruction_guidance: float | None = None, edit=None, strength: float | None = None,
             edit_method: str = 'sdedit', source_prompts: list | None = None,
             flowedit_noise_draws: int | None = None, size: tuple[int, int, int] | None = None) -> np.ndarray:
  """uint8 videos [len(prompts), T, H, W, 3]; unset options come from `config.sample`.

  `size` (frames, height, width): any size the autoencoder and patch divide, up to
  `config.sample.max_tokens`. With `config.objective.shift_base_tokens` set, the time shift (the
  config's or `time_shift`) is multiplied by sqrt(tokens / shift_base_tokens), as in training (`rf.size_shift`).

  `prompts` are captions, or class indices for a class-conditional model. `negative_prompt`
  replaces the empty caption in the unconditional branch of guidance (see `conditioning`).
  Given frames (a frame-conditioned model): `given` uint8 [T, H, W, 3] (or one per prompt) of which
  the frames `given_mask` (bool [T]) are kept and the rest generated around them; they come back
  unchanged (in pixel space exactly). `frame_guidance_scale` != 1 guides toward them separately;
  `reconstruction_guidance` > 0 ties the generated frames' motion to theirs (`rf.reconstruction_correction`;
  about twice the sampling time); unset, it is `config.sample.extension_reconstruction_guidance` where the
  given frames are an extension's (`is_extension`), else `config.sample.reconstruction_guidance`.
  Through a causal VAE a given frame conditions the latent frame that holds it (the first
  latent frame holds frame 0 alone; later ones 4 frames, whose other frames then come along).
  SDEdit: `edit` uint8 [T, H, W, 3] (or one per prompt) noised to level `strength` in (0, 1] and
  denoised from there. `edit_method='flowedit'`: FlowEdit from `strength` instead (`rf.flow_edit`;
  keeps motion and layout better at the noise levels that change color), with `source_prompts`
  describing the input video (None: the empty caption), averaging `flowedit_noise_draws` noises a step
  (None: `FLOWEDIT_NOISE_DRAWS`). An edit's unset strength and guidance are `edit_settings`'s.
  Higher-level modes are in `sora_jax.prompting`.
  """
  cfg = model.config
  if prompts is None or isinstance(prompts, (str, bytes)) or not len(prompts):
    raise UsageError(f'prompts={prompts!r}: give a list of one or more captions (class indices), e.g. ["a red circle"]')
  if isinstance(source_prompts, (str, bytes)):
    raise UsageError(f'source_prompts={source_prompts!r}: give a list, one caption per prompt')
  if negative_prompt is not None and not isinstance(negative_prompt, str):
    raise UsageError(f'negative_prompt={negative_prompt!r}: give one caption (a string), used for every prompt')
  if edit is None and (strength is not None or edit_method != 'sdedit'):
    raise UsageError('strength and edit_method go with edit= (a video to edit)')
  if given_mask is not None and given is None:
    raise UsageError('given_mask goes with given= (the frames it marks)')
  num_steps = cfg.sample.num_steps if num_steps is None else num_steps
  if edit is not None:
    strength, guidance_scale = edit_settings(edit_method, strength, guidance_scale)
  guidance_scale = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
  time_shift = cfg.sample.time_shift if time_shift is None else time_shift
  if frame_guidance_scale is None:
    frame_guidance_scale = cfg.sample.get('frame_guidance_scale', 1.0)
  if reconstruction_guidance is None:  # workdirs from before these options: 0
    field = 'extension_reconstruction_guidance' if given is not None and is_extension(given_mask) else 'reconstruction_guidance'
    reconstruction_guidance = cfg.sample.get(field, 0.0)
  if not reconstruction_guidance >= 0:
    raise UsageError(f'reconstruction_guidance={reconstruction_guidance}: use a scale >= 0 (0: off)')
  if stochasticity is None:
    stochasticity = cfg.sample.get('stochasticity', 0.0)  # workdirs from before the option: 0
  if num_steps < 1:
    raise UsageError(f'steps={num_steps}: need at least one sampling step')
  if not 0 <= stochasticity <= 1:
    raise UsageError(f'stochasticity={stochasticity}: use a value in [0, 1]')
  b = len(prompts)
  size = tuple(size or (cfg.data.frames, cfg.data.height, cfg.data.width))
  shape = check_size(cfg, model.autoencoder, *size, names=('frames', 'height', 'width'), sampling=True)
  tokens = packing.tokens_of(shape, cfg.model.patch)
  time_shift = float(rf.size_shift(time_shift, tokens, cfg.objective.get('shift_base_tokens')))
  frames = (*size, 3)
  pt = cfg.model.patch[0]
  latent_t, shape = shape[0], (dit.still_frames(shape[0], pt), *shape[1:])  # an image: generated as a still clip
  cond, null_cond = conditioning(cfg, list(prompts), model.text_encoder, negative_prompt)
  key, sde_key = jax.random.split(jax.random.key(seed))
  # One noise per prompt index, so a prompt's video does not depend on the batch around it.
  noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (*shape, model.autoencoder.channels)))(
      jnp.arange(b))
  rng_b = jax.vmap(lambda i: jax.random.fold_in(sde_key, i))(jnp.arange(b))
  start, t_start, given_latents = noise, 1.0, None
  if edit is not None:
    if not 0 < strength <= 1:
      raise UsageError(f'strength={strength}: an edit needs a noise level in (0, 1]')
    x_edit = dit.repeat_stills(_encode(model.autoencoder, model.autoencoder.params, _pixels(edit, b, frames, 'edit')), pt)
    start, t_start = rf.interpolate(x_edit, noise, jnp.full((b,), strength)), float(strength)
  if edit is not None and edit_method == 'flowedit':
    if given is not None:
      raise UsageError('edit_method="flowedit" takes no given frames (SDEdit does)')
    if source_prompts is not None and len(source_prompts) != b:
      raise UsageError(f'{len(source_prompts)} source prompts for {b} prompts: give one per prompt')
    draws = FLOWEDIT_NOISE_DRAWS if flowedit_noise_draws is None else flowedit_noise_draws
    if not (isinstance(draws, (int, np.integer)) and draws >= 1):
      raise UsageError(f'flowedit_noise_draws={draws!r}: use a whole number >= 1')
    has_source = source_prompts is not None
    source = conditioning(cfg, list(source_prompts if has_source else prompts), model.text_encoder)[0 if has_source else 1]
    latents = _flow_edit_latents(model.params, model.graphdef, x_edit, cond, null_cond, source, guidance_scale,
                                 time_shift, rng_b, jnp.float32(t_start), num_steps=num_steps,
                                 prediction=cfg.objective.prediction, noise_draws=int(draws))
    return _to_videos(model, latents, size)
  if source_prompts is not None or flowedit_noise_draws is not None:
    raise UsageError('source_prompts and flowedit_noise_draws go with edit_method="flowedit"')
  if given is not None:
    if not cfg.model.get('frame_conditioning', False):
      raise UsageError('this model was trained without frame conditioning (config.model.frame_conditioning): '
                       'it cannot be given frames; SDEdit (edit=) works with any model')
    given_mask = np.asarray(given_mask, bool)
    if given_mask.shape != (frames[0],):
      raise UsageError(f'given_mask has shape {given_mask.shape}; expected ({frames[0]},), one per frame')
    factor = 1 if latent_t == frames[0] else (frames[0] - 1) // max(latent_t - 1, 1)
    latent_mask = np.resize(fc.latent_frame_mask(given_mask, factor), shape[0])  # a still: repeated
    given_latents = dict(x=dit.repeat_stills(_encode(model.autoencoder, model.autoencoder.params,
                                                     _pixels(given, b, frames, 'given')), pt),
                         mask_bt=jnp.broadcast_to(jnp.asarray(latent_mask), (b, shape[0])))
  latents = _sample_latents(model.params, model.graphdef, noise, start, cond, null_cond, guidance_scale, time_shift,
                            rng_b, given_latents, frame_guidance_scale, jnp.float32(reconstruction_guidance),
                            num_steps=num_steps, prediction=cfg.objective.prediction,
                            stochasticity=float(stochasticity), t_start=jnp.float32(t_start),
                            frame_guidance=given is not None and frame_guidance_scale != 1.0,
                            reconstruction=given is not None and reconstruction_guidance > 0)
  return _to_videos(model, latents, size)


def is_extension(given_mask) -> bool:
  """Whether the given frames (bool [T]) are one run of 2 or more at the start or at the end, but not all:
  a video continued forward or backward, whose motion they show."""
  mask = np.asarray(given_mask, bool)
  k = int(mask.sum())
  return 2 <= k < mask.size and bool(mask[:k].all() or mask[-k:].all())


def _to_videos(model: Model, latents, size: tuple[int, int, int]) -> np.ndarray:
  """Decoded uint8 videos [b, *size, 3] of sampled latents."""
  pixels = _decode(model.autoencoder, model.autoencoder.params, latents)[:, :size[0]]  # a still: its first frame
  if not getattr(pixels, 'is_fully_addressable', True):  # sharded over several processes' devices
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    pixels = multihost_utils.process_allgather(pixels, tiled=True)
  return video.to_uint8(jax.device_get(pixels))


def _pixels(clips, b: int, shape: tuple, name: str):
  """uint8 [T, H, W, 3] or [b, T, H, W, 3] -> float [b, T, H, W, 3] in [-1, 1]."""
  clips = np.asarray(clips)
  if clips.dtype != np.uint8:  # floats in [0, 1] or [-1, 1] would silently read as near-black
    raise UsageError(f'{name}: frames of dtype {clips.dtype}; give uint8 in [0, 255] '
                     '(e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])')
  if clips.shape == shape:
    clips = np.broadcast_to(clips, (b, *shape))
  if clips.shape != (b, *shape):
    raise UsageError(f'{name}: frames of shape {clips.shape}; expected {shape} or {(b, *shape)}')
  return jnp.asarray(clips, jnp.float32) / 127.5 - 1.0


@partial(jax.jit, static_argnums=0)
def _encode(autoencoder, params, video_bthwc):
  return autoencoder.encode(params, video_bthwc)


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


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training workdir was trained with (its config.json)."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise UsageError(f'{config_path} not found: is --workdir a training workdir?')
  with open(config_path) as f:
    return ml_collections.ConfigDict(json.load(f))


PARAMS = ('ema', 'raw')
# An edit's defaults for --strength (per --edit_method) and --guidance_scale (config.sample's is for
# text-to-video): the best of those measured on `shapes` (README, "Prompting").
EDIT_STRENGTH = dict(sdedit=0.7, flowedit=0.85)
EDIT_GUIDANCE = 3.0
FLOWEDIT_NOISE_DRAWS = 4  # noises averaged a FlowEdit step (rf.flow_edit): steadier color changes, 4x the calls


def edit_settings(edit_method: str, strength: float | None, guidance_scale: float | None) -> tuple[float, float]:
  """An edit's (strength, guidance scale): the given ones, or the defaults of `edit_method`."""
  if edit_method not in EDIT_METHODS:
    raise UsageError(f'edit_method={edit_method!r}: use one of {EDIT_METHODS}')
  return (EDIT_STRENGTH[edit_method] if strength is None else strength,
          EDIT_GUIDANCE if guidance_scale is None else guidance_scale)


def load(workdir: str, step: int | None = None, params: str = 'ema') -> Model:
  """Restores the EMA parameters of `workdir` (`params='raw'`: the trained ones, not averaged),
  sharded (FSDP) over the local devices."""
  if params not in PARAMS:
    raise UsageError(f'params={params!r}: use one of {", ".join(PARAMS)}')
  config = read_config(workdir)
  kernel_platform = {'cudnn': 'gpu', 'splash': 'tpu'}.get(config.model.get('attention_impl'))
  if kernel_platform not in (None, jax.default_backend()):
    config.model.attention_impl = 'xla'  # the same attention, without the GPU or TPU kernel
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
  restore = checkpoint.restore_ema if params == 'ema' else checkpoint.restore_params
  weights = restore(mngr, step, target)
  mngr.close()
  text_encoder = text_lib.from_config(config, mesh, sharding.rules_tuple(config.sharding_rules))
  return Model(config, graphdef, weights, ae, step, text_encoder)


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  """Defined on demand, so that importing this module (as train.py does) defines no flags."""
  flags.DEFINE_string('workdir', None, 'Training workdir to sample from.')
  flags.DEFINE_multi_string('prompt', None, 'Text prompt (a class index for a class-conditional model); '
                            'repeat for several videos; "" (a text model): without a caption (unconditional).')
  flags.DEFINE_string('out', 'sample.mp4', 'Output .mp4, .gif, or .png for one frame; with several prompts, '
                      '_0, _1, ... are inserted before the suffix.')
  flags.DEFINE_float('guidance_scale', None, 'Classifier-free guidance scale (default: config; with --edit: '
                     f'{EDIT_GUIDANCE}).')
  flags.DEFINE_integer('steps', None, 'Sampling steps (default: config).')
  flags.DEFINE_float('stochasticity', None, 'Share of fresh noise per step, 0 (deterministic flow) to 1 '
                     '(default: config).')
  flags.DEFINE_string('negative_prompt', None, 'What guidance steers away from (text models; default: '
                      'the empty caption).')
  flags.DEFINE_integer('seed', 0, 'Noise seed.')
  flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step to use (default: latest).')
  flags.DEFINE_enum('params', 'ema', PARAMS, 'Sample with the EMA parameters or the raw (not averaged) ones.')
  flags.DEFINE_integer('upscale', 1, 'Repeat pixels this many times in the written video.')
  # Prompting with images and videos (a model trained with frame conditioning; sora_jax/prompting.py).
  flags.DEFINE_multi_string('keyframe', None, 'PATH@INDEX: an image placed at output frame INDEX (negative: '
                            'from the end); repeatable. a.png@0 is image-to-video; a.png@0 b.png@-1 interpolates.')
  flags.DEFINE_string('extend', None, 'A video the output starts with and continues.')
  flags.DEFINE_string('extend_backward', None, 'A video the output ends with: what came before it.')
  flags.DEFINE_string('edit', None, 'A video to edit with the prompt: motion and layout stay, what the prompt '
                      'changes changes (--edit_method).')
  flags.DEFINE_float('strength', None, 'Edit noise level in (0, 1] (default 0.7 for sdedit, 0.85 for flowedit): '
                     'higher changes more.')
  flags.DEFINE_enum('edit_method', 'sdedit', EDIT_METHODS, 'sdedit: noise the video to --strength and denoise '
                    'it with the prompt; flowedit: FlowEdit from --strength (keeps paths better when colors change).')
  flags.DEFINE_string('source_prompt', None, 'With --edit_method=flowedit: what the edited video shows '
                      '(default: the empty caption).')
  flags.DEFINE_integer('flowedit_noise_draws', None, 'With --edit_method=flowedit: noises averaged a step '
                       f'(default {FLOWEDIT_NOISE_DRAWS}; 1: one a step, the fastest).')
  flags.DEFINE_bool('loop', False, 'Make the last frame lead back into the first.')
  flags.DEFINE_integer('frames', None, 'Output frames (default: the training length); longer outputs are '
                       'made window by window, each given the last half of the previous one; 1: an image; with --edit: '
                       'the one window\'s length (default: the clip\'s, up to the model\'s).')
  flags.DEFINE_integer('height', None, 'Output height in pixels (default: the config\'s); the patch must divide it.')
  flags.DEFINE_integer('width', None, 'Output width in pixels (default: the config\'s); the patch must divide it.')
  flags.DEFINE_float('frame_guidance_scale', None, 'Guidance toward given frames (default: config; 1: none '
                     'beyond the text guidance).')
  flags.DEFINE_float('reconstruction_guidance', None, 'Reconstruction guidance with given frames (default: '
                     'the config\'s, for --extend / --extend_backward / long outputs its extension_reconstruction_guidance; '
                     '0: off): ties the generated motion to theirs, at about twice the sampling time.')


def output_paths(out: str, count: int) -> list[str]:
  """The video paths for `count` prompts, checked writable before any sampling is done."""
  root, suffix = os.path.splitext(out)
  if suffix.lower() not in video.SUFFIXES:
    raise UsageError(f'--out={out}: use a .mp4, .gif or .png (one frame) file name')
  ensure_writable_dir(os.path.dirname(os.path.abspath(out)), f'--out={out}')
  return [out] if count == 1 else [f'{root}_{i}{suffix}' for i in range(count)]


def parse_keyframes(specs: list[str] | None) -> list[tuple[str, int]]:
  """['a.png@0', 'b.png@-1'] -> [('a.png', 0), ('b.png', -1)]; a malformed one is a UsageError."""
  parsed = []
  for spec in specs or ():
    path, at, index = spec.rpartition('@')
    try:
      parsed.append((path, int(index)))
    except ValueError:
      at = ''
    if not at or not path:
      raise UsageError(f'--keyframe={spec}: use PATH@INDEX, e.g. first.png@0 or last.png@-1')
  return parsed


def check_prompting_flags() -> None:
  """Flag combinations that make no sense, before anything is loaded."""
  if FLAGS.extend and FLAGS.extend_backward:
    raise UsageError('--extend and --extend_backward: give one')
  if FLAGS.strength is not None and not FLAGS.edit:
    raise UsageError('--strength goes with --edit')
  if FLAGS.edit and (FLAGS.keyframe or FLAGS.extend or FLAGS.extend_backward or FLAGS.loop):
    raise UsageError('--edit combines with the prompt, size, guidance, seed and steps only')
  if FLAGS.loop and FLAGS.extend_backward:
    raise UsageError('--loop and --extend_backward: a loop remakes the last frames, which --extend_backward '
                     'gives; give one')
  if (FLAGS.source_prompt is not None or FLAGS.edit_method != 'sdedit') and not FLAGS.edit:
    raise UsageError('--edit_method and --source_prompt go with --edit')
  if FLAGS.source_prompt is not None and FLAGS.edit_method != 'flowedit':
    raise UsageError('--source_prompt goes with --edit_method=flowedit')
  if FLAGS.flowedit_noise_draws is not None and FLAGS.edit_method != 'flowedit':
    raise UsageError('--flowedit_noise_draws goes with --edit_method=flowedit')
  if FLAGS.flowedit_noise_draws is not None and FLAGS.flowedit_noise_draws < 1:
    raise UsageError(f'--flowedit_noise_draws={FLAGS.flowedit_noise_draws}: use a whole number >= 1')
  if FLAGS.reconstruction_guidance is not None and not FLAGS.reconstruction_guidance >= 0:
    raise UsageError(f'--reconstruction_guidance={FLAGS.reconstruction_guidance}: use a scale >= 0 (0: off)')
  if FLAGS.edit and FLAGS.strength is not None and not 0 < FLAGS.strength <= 1:
    raise UsageError(f'--strength={FLAGS.strength}: use a noise level in (0, 1]')
  for name in ('frames', 'height', 'width', 'steps', 'upscale'):
    if FLAGS[name].value is not None and FLAGS[name].value < 1:
      raise UsageError(f'--{name}={FLAGS[name].value}: must be a positive integer')


def edit_size(cfg, autoencoder, clip_thwc: np.ndarray, frames: int | None = None, height: int | None = None,
              width: int | None = None) -> tuple[tuple[int, int, int], str | None]:
  """((T, H, W) of an edit's one window, a note if the clip's own size was not usable): `frames`, else the
  clip's length up to the model's window (`prompting.window_length`); `height`/`width`, else the clip's
  own for a model trained at native sizes that makes that size, else the config's. A size the model
  does not make is a one-line error naming --frames/--height/--width."""
  from sora_jax import prompting
  T = frames or prompting.window_length(cfg, len(clip_thwc))
  H, W = height or cfg.data.height, width or cfg.data.width
  note = None
  if not (height or width) and prompting.native_sizes(cfg):
    h, w = clip_thwc.shape[1:3]
    try:
      check_size(cfg, autoencoder, T, h, w, sampling=True)
      return (T, h, w), None
    except UsageError as e:
      note = f"edit: not at the clip's own size ({e}); at {W}x{H}"
  check_size(cfg, autoencoder, T, H, W, names=('--frames', '--height', '--width'), sampling=True)
  return (T, H, W), note


def run_prompting(model: Model, prompts: list, keyframe_specs: list, edit_clip=None, edit_thw=None,
                  **kw) -> np.ndarray:
  """The videos the flags ask for: plain text-to-video, or with keyframes, extension, edit, loop, length.
  An edit's clip (uint8 [T, H, W, 3] as read) and its size (`edit_size`) are read before loading."""
  from sora_jax import prompting
  cfg = model.config
  H, W = FLAGS.height or cfg.data.height, FLAGS.width or cfg.data.width

  def read(reader, path):
    frames, note = reader(path, H, W)
    if note:
      print(note)
    return frames

  if FLAGS.edit:
    _, H, W = edit_thw  # its frames: prompting.edit's, from --frames or the clip (as edit_size's)
    clip, note = prompting.fit_frames(edit_clip, H, W, FLAGS.edit)
    if note:
      print(note)
    source = None if FLAGS.source_prompt is None else [FLAGS.source_prompt] * len(prompts)
    videos, note = prompting.edit(model, prompts, clip, frames=FLAGS.frames, strength=FLAGS.strength,
                                  edit_method=FLAGS.edit_method, source_prompts=source,
                                  flowedit_noise_draws=FLAGS.flowedit_noise_draws, **kw)
    if note:
      print(note)
  else:
    frames = FLAGS.frames or cfg.data.frames
    images = [(read(prompting.read_image, path), index) for path, index in keyframe_specs]
    clip_path = FLAGS.extend or FLAGS.extend_backward
    clip = read(prompting.read_video, clip_path) if clip_path else None
    given, note = prompting.given_frames(frames, images, clip, backward=bool(FLAGS.extend_backward))
    if note:
      print(note)
    videos = prompting.generate_frames(model, prompts, given, frames=frames, height=H, width=W,
                                       backward=bool(FLAGS.extend_backward), loop=FLAGS.loop, **kw)
  return videos


def main(argv):
  del argv
  quiet_library_logs()
  init_devices()
  try:
    if not FLAGS.workdir or not FLAGS.prompt:
      raise UsageError('--workdir and --prompt are required')
    check_prompting_flags()
    keyframe_specs = parse_keyframes(FLAGS.keyframe)
    paths = output_paths(FLAGS.out, len(FLAGS.prompt))
    cfg = read_config(FLAGS.workdir)  # sizes are checked before anything is loaded
    from sora_jax import prompting
    autoencoder = autoencoder_lib.make(cfg.autoencoder, load_weights=False)
    edit_clip = edit_thw = None
    if FLAGS.edit:  # one window, whose size may be the clip's
      edit_clip = prompting.read_video(FLAGS.edit, None, None)[0]
      edit_thw, note = edit_size(cfg, autoencoder, edit_clip, FLAGS.frames, FLAGS.height, FLAGS.width)
      if note:
        print(note)
    frames = edit_thw[0] if FLAGS.edit else FLAGS.frames or cfg.data.frames
    for _, index in keyframe_specs:  # before any file is read or the model loaded
      prompting.frame_index(index, frames, 'keyframe')
    if paths[0].lower().endswith('.png') and frames != 1:
      raise UsageError(f'--out={FLAGS.out}: a .png holds one frame; pass --frames=1 or write .mp4/.gif')
    if not FLAGS.edit and (FLAGS.height or FLAGS.width or FLAGS.frames):  # each window of the output
      check_size(cfg, autoencoder, prompting.window_length(cfg, frames),
                 FLAGS.height or cfg.data.height, FLAGS.width or cfg.data.width,
                 names=('--frames', '--height', '--width'), sampling=True)
    if FLAGS.loop:
      prompting.check_loop(cfg, frames)
    model = load(FLAGS.workdir, FLAGS.checkpoint_step, FLAGS.params)
    kw = dict(seed=FLAGS.seed, num_steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale,
              stochasticity=FLAGS.stochasticity, negative_prompt=FLAGS.negative_prompt,
              frame_guidance_scale=FLAGS.frame_guidance_scale, reconstruction_guidance=FLAGS.reconstruction_guidance)
    videos = run_prompting(model, FLAGS.prompt, keyframe_specs, edit_clip, edit_thw, **kw)
    for prompt, path, v in zip(FLAGS.prompt, paths, videos):
      try:
        video.write(path, v, fps=model.config.sample.fps, upscale=FLAGS.upscale)
      except OSError as e:
        raise UsageError(f'cannot write {path}: {e.strerror or e}') from None
      print(f'{path}: "{prompt}" (step {model.step})')
  except UsageError as e:
    sys.exit(f'error: {e}')


def parse_flags(argv):
  """absl's parser, with a bad flag value (e.g. --frames=abc) reported in one `error:` line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
