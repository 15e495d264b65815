"""Evaluation during training (`config.eval`): per-timestep validation loss, FVD, adherence, videos.

Every `config.eval.every_steps` steps (and after the last) the EMA parameters are scored on the
first `config.eval.num_videos` validation clips:
  eval/loss_t{t}    the training objective at fixed noise levels t (bucket centres), with fixed
                    noise, so curves are comparable across steps; eval/loss is their mean;
  eval/fvd          FVD between the clips and samples for their captions (`config.eval.features`:
                    the `shapes` classifier, the I3D from `config.eval.i3d_path`, or none). With
                    few videos the value is biased upward; compare it only at one `num_videos`;
  eval/adherence/*  on `shapes`: analytic color / shape / direction / all accuracy of the samples
                    (and shape_<name>: per asked shape),
                    and (with the classifier as features) eval/learned_adherence/* from its heads;
and the first `config.eval.videos_to_tensorboard` samples go to TensorBoard.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from sora_jax import UsageError, sample
from sora_jax.data import pipeline
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.eval import adherence, classifier, fvd, i3d
from sora_jax.models import dit

FEATURES = ('auto', 'shapes_classifier', 'i3d', 'none')


def enabled(config) -> bool:
  """Evaluation needs clips: latents precomputed by `sora_jax.encode` have none, so it is off there."""
  return bool(config.get('eval')) and config.eval.every_steps > 0 and not pipeline.is_encoded(config.data)


def validate(config) -> None:
  """One-line errors for `config.eval`, before anything compiles."""
  if not config.get('eval'):
    return
  e = config.eval
  if not isinstance(e.every_steps, int) or e.every_steps < 0:
    raise UsageError(f'config.eval.every_steps={e.every_steps!r}: a step count (0: no evaluation)')
  if not enabled(config):
    return
  if not isinstance(e.num_videos, int) or e.num_videos < 2:
    raise UsageError(f'config.eval.num_videos={e.num_videos!r}: need at least 2 (FVD fits a covariance)')
  if not isinstance(e.timestep_buckets, int) or not 1 <= e.timestep_buckets <= 50:
    raise UsageError(f'config.eval.timestep_buckets={e.timestep_buckets!r}: use 1 to 50')
  if e.features not in FEATURES:
    raise UsageError(f'config.eval.features={e.features!r}: use one of {FEATURES}')
  if e.features == 'shapes_classifier' and config.data.name != 'shapes':
    raise UsageError(f'config.eval.features="shapes_classifier" needs shapes data (config.data.name={config.data.name!r})')
  if e.features == 'i3d' and not e.get('i3d_path'):
    raise UsageError('config.eval.features="i3d" needs config.eval.i3d_path (a piergiaj InceptionI3d .pt or .npz)')
  if e.features == 'i3d' and config.data.frames < i3d.MIN_FRAMES:
    raise UsageError(f'config.eval.features="i3d" needs clips of {i3d.MIN_FRAMES}+ frames; '
                     f'config.data.frames={config.data.frames} (use features="shapes_classifier" or "none")')


def feature_network(config):
  """(feature fn or None, its name)."""
  kind = config.eval.features
  if kind == 'auto':
    kind = 'shapes_classifier' if config.data.name == 'shapes' else 'none'
  if kind == 'shapes_classifier':
    return classifier.for_data(config.data).features, kind
  if kind == 'i3d':
    return i3d.load(config.eval.i3d_path), kind
  return None, 'none'


def timestep_loss_fn(config, graphdef, autoencoder):
  """jitted (params, autoencoder params, uint8 videos, cond, noise, t) -> the training objective (plain
  text-to-video: no caption dropout, no given frames) with every sample at noise level t."""
  obj = config.objective

  @jax.jit
  def loss_at(params, ae_params, videos_bthwc, cond, noise, t):
    x0 = autoencoder.encode(ae_params, videos_bthwc.astype(jnp.float32) / 127.5 - 1.0)
    net = nnx.merge(graphdef, params)
    t_b = jnp.full((x0.shape[0],), t, jnp.float32)
    return rf.loss(lambda x_t, tt: net(x_t, tt, **cond), x0, noise, t_b, prediction_type=obj.prediction,
                   min_t=obj.min_t)[0]

  return loss_at


def bucket_centres(num_buckets: int) -> np.ndarray:
  """The centres of `num_buckets` equal noise-level buckets in (0, 1)."""
  return (np.arange(num_buckets) + 0.5) / num_buckets


def timestep_losses(loss_at, params, ae_params, videos, cond, noise, timesteps) -> np.ndarray:
  """`loss_at` (from `timestep_loss_fn`) at each t: all dispatched, then read back once."""
  return np.asarray(jax.device_get([loss_at(params, ae_params, videos, cond, noise, t) for t in timesteps]),
                    np.float64)


class Evaluator:
  """Scores parameters on a fixed validation set; `evaluator(params, step, frozen) -> (scalars, videos)`.

  Build it outside the training mesh: the feature network (the shapes classifier, trained on first
  use, or I3D) and the clips' features are then computed on each process's own device.
  """

  def __init__(self, config, graphdef, autoencoder):
    self.config, self.graphdef, self.autoencoder = config, graphdef, autoencoder
    e = config.eval
    source = pipeline.data_source(config.data, 'validation')
    n = min(e.num_videos, len(source))
    if n < 2:
      raise UsageError(f'config.eval: the validation split of config.data.name={config.data.name!r} has {len(source)} '
                       'clips; FVD needs at least 2 (or set config.eval.every_steps=0)')
    records = [source[i] for i in range(n)]
    self.videos = np.stack([r['video'] for r in records])  # uint8 [n, T, H, W, 3]
    if dit.is_class_conditional(config.model):  # shapes: the class of (color, shape, direction)
      self.prompts = [int(pipeline.to_example(r, config.data.max_text_len)['label']) for r in records]
    else:
      self.prompts = [r['caption'].decode() if isinstance(r['caption'], bytes) else str(r['caption']) for r in records]
    self.is_shapes = config.data.name == 'shapes' and not dit.is_class_conditional(config.model)
    self.features, self.features_name = feature_network(config)
    self.feature_batch = 16 if self.features_name == 'i3d' else 64  # I3D: 224 x 224 inputs
    self.real_stats = (fvd.Statistics.of(fvd.features(self.features, self.videos, self.feature_batch))
                       if self.features else None)
    # Learned adherence reads the classifier's heads: only where it is the feature network too.
    self.learned = classifier.for_data(config.data) if self.is_shapes and self.features_name == 'shapes_classifier' else None
    self.timesteps = bucket_centres(e.timestep_buckets)
    shape = autoencoder.latent_shape(*self.videos.shape[1:4])
    self.noise = jax.random.normal(jax.random.key(config.seed + 7), (n, *shape, autoencoder.channels))
    self._loss_at = timestep_loss_fn(config, graphdef, autoencoder)

  def __call__(self, params, step: int, frozen: dict, text_encoder=None) -> tuple[dict, dict]:
    """`frozen`: the train step's frozen parameters (the autoencoder's, placed on the mesh)."""
    start = time.time()
    cond, _ = sample.conditioning(self.config, self.prompts, text_encoder)
    scalars = {}
    losses = timestep_losses(self._loss_at, params, frozen['autoencoder'], self.videos, cond, self.noise,
                             self.timesteps).tolist()
    scalars.update({f'eval/loss_t{t:.2f}': v for t, v in zip(self.timesteps, losses)})
    scalars['eval/loss'] = float(np.mean(losses))
    model = sample.Model(self.config, self.graphdef, params, self.autoencoder, step, text_encoder)
    generated = sample.generate(model, self.prompts, seed=self.config.seed + 1)
    if self.real_stats is not None:
      fake = fvd.Statistics.of(fvd.features(self.features, generated, self.feature_batch))
      scalars['eval/fvd'] = fvd.frechet_distance(self.real_stats, fake)
    if self.is_shapes:
      scalars.update({f'eval/adherence/{k}': v for k, v in adherence.score(generated, self.prompts).items() if k != 'n'})
    if self.learned is not None:
      scalars.update({f'eval/learned_adherence/{k}': v for k, v in self.learned.adherence(generated, self.prompts).items()})
    scalars['eval/seconds'] = time.time() - start
    count = self.config.eval.get('videos_to_tensorboard', 4)
    names = [f'eval/{i:02d}_' + str(p).replace(' ', '_') for i, p in enumerate(self.prompts[:count])]
    logging.info('eval at step %d: %s', step, {k: round(v, 4) for k, v in scalars.items() if 'loss_t' not in k})
    return scalars, dict(zip(names, generated[:count]))
