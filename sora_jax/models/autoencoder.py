"""Autoencoders map pixels [b, T, H, W, 3] in [-1, 1] to the latent the DiT denoises, and back.

`config.autoencoder.kind`:
  'identity'  the DiT works in pixel space (the embedded default);
  'wan'       a Wan 2.1 causal video VAE imported from a diffusers folder (`config.autoencoder.path`,
              `vae_convert.load_wan`): x4 in time (T = 1 + 4n frames), x8 in space, 16 channels;
  'workdir'   a VAE trained here (`configs/vae_shapes.py`): `config.autoencoder.path` is its
              workdir, whose latest checkpoint's EMA parameters are used.

Interface: `channels`, `latent_shape(frames, height, width)`, `params` (frozen: the train step takes
them as an argument, never as a constant), `encode(params, video)` and `decode(params, latent)`,
pure functions to call inside jit. A VAE's latent is the posterior mean, normalised per channel
by the folder's statistics; `decode` undoes that and clips to [-1, 1].
"""

import os

from flax import nnx

from sora_jax import UsageError

KINDS = ('identity', 'wan', 'workdir')


class Identity:
  channels = 3
  params = {}

  def encode(self, params, video_bthwc):
    del params
    return video_bthwc

  def decode(self, params, latent_bthwc):
    del params
    return latent_bthwc

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    return frames, height, width


class PretrainedVAE:
  """A frozen `vae.VideoVAE` behind the autoencoder interface."""

  def __init__(self, model, path: str = ''):
    self.path = path
    self.cfg = model.cfg
    self.channels = model.cfg.z_dim
    self.graphdef, state = nnx.split(model)
    self.params = state.to_pure_dict()

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    return self.cfg.latent_shape(frames, height, width)

  def encode(self, params, video_bthwc):
    model = nnx.merge(self.graphdef, params)
    mean, _ = model.encode(video_bthwc)
    return model.normalize(mean)

  def decode(self, params, latent_bthwc):
    model = nnx.merge(self.graphdef, params)
    return model.decode(model.denormalize(latent_bthwc))

  def encode_bounded(self, params, video_bthwc, *, chunk_frames: int = 0, tile: int = 0, overlap: int = 0):
    """`encode` in bounded memory, outside jit (it loops over jitted pieces): `chunk_frames` frames at
    a time after frame 0 (equal to `encode`) and, with `tile` > 0, spatial tiles of `tile` pixels
    blended over `overlap` (approximate; `vae.encode_tiled`)."""
    from sora_jax.models import vae  # pylint: disable=g-import-not-at-top
    model = nnx.merge(self.graphdef, params)
    tf = self.cfg.temporal_factor
    chunk = chunk_frames or max(tf, -(-(video_bthwc.shape[1] - 1) // tf) * tf)  # 0: the whole clip
    if tile:
      mean = vae.encode_tiled(model, video_bthwc, tile, overlap, chunk)
    else:
      mean = vae.encode_chunked(model, video_bthwc, chunk)[0]
    return model.normalize(mean)


def validate(autoencoder_config) -> None:
  """UsageError naming the field for a bad `config.autoencoder`, before anything is loaded."""
  kind = autoencoder_config.kind
  if kind not in KINDS:
    raise UsageError(f'config.autoencoder.kind={kind!r}: use one of {KINDS}')
  if kind != 'identity':
    path = autoencoder_config.get('path')
    if not path:
      what = 'a diffusers AutoencoderKLWan folder' if kind == 'wan' else 'the workdir of a VAE run'
      raise UsageError(f'config.autoencoder.path is not set: give {what}')
    if not os.path.isdir(path):
      raise UsageError(f'config.autoencoder.path={path!r}: no such folder')


def make(autoencoder_config, load_weights: bool = True):
  """The autoencoder of `config.autoencoder`. A VAE's weights are read here (on the default device);
  with `load_weights=False` only its config.json is, and `params` are shapes (for validation,
  abstract models and ahead-of-time compiles)."""
  validate(autoencoder_config)
  if autoencoder_config.kind == 'identity':
    return Identity()
  try:
    if autoencoder_config.kind == 'workdir':
      model = load_workdir(autoencoder_config.path, abstract=not load_weights)
    else:
      from sora_jax.models import vae_convert  # pylint: disable=g-import-not-at-top
      model = vae_convert.load_wan(autoencoder_config.path, abstract=not load_weights)
  except UsageError as e:
    raise UsageError(f'config.autoencoder.path: {e}') from None
  return PretrainedVAE(model, autoencoder_config.path)


def load_workdir(workdir: str, abstract: bool = False):
  """The `vae.VideoVAE` of a `configs/vae_shapes.py`-style run: its config.json and the EMA
  parameters of its latest checkpoint (shapes only with `abstract`)."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sora_jax import checkpoint, train_vae  # pylint: disable=g-import-not-at-top
  from sora_jax.models import vae  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UsageError(f'{workdir}: no config.json (expected the workdir of a VAE run)')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if not train_vae.IS_VAE(config):
    raise UsageError(f'{workdir}: a run of config.trainer={config.get("trainer", "dit")!r}, not a VAE')
  cfg = train_vae.vae_config(config)
  model = nnx.eval_shape(lambda: vae.VideoVAE(cfg, rngs=nnx.Rngs(0)))
  if abstract:
    return model
  mngr = checkpoint.manager(workdir, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise UsageError(f'{workdir}: no checkpoint yet')
  graphdef, state = nnx.split(model)
  ema = checkpoint.restore_ema(mngr, step, state.to_pure_dict())
  mngr.close()
  state.replace_by_pure_dict(ema)
  return nnx.merge(graphdef, state)

