"""Autoencoders map pixels [b, T, H, W, 3] in [-1, 1] to the latent the DiT denoises, and back.

`config.autoencoder.kind`:
  'identity'  the DiT works in pixel space (the embedded default);
  'wan'       a Wan 2.1 causal video VAE imported from a diffusers folder (`config.autoencoder.path`,
              `vae_convert.load_wan`): x4 in time (T = 1 + 4n frames), x8 in space, 16 channels.

Interface: `channels`, `latent_shape(frames, height, width)`, `params` (frozen: the train step takes
them as an argument, never as a constant), `encode(params, video)` and `decode(params, latent)`,
pure functions to call inside jit. A VAE's latent is the posterior mean, normalised per channel
by the folder's statistics; `decode` undoes that and clips to [-1, 1].
"""

import os

from flax import nnx

from sora_jax import UsageError

KINDS = ('identity', 'wan')


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


def validate(autoencoder_config) -> None:
  """UsageError naming the field for a bad `config.autoencoder`, before anything is loaded."""
  kind = autoencoder_config.kind
  if kind not in KINDS:
    raise UsageError(f'config.autoencoder.kind={kind!r}: use one of {KINDS}')
  if kind == 'wan':
    path = autoencoder_config.get('path')
    if not path:
      raise UsageError('config.autoencoder.path is not set: give a diffusers AutoencoderKLWan folder')
    if not os.path.isdir(path):
      raise UsageError(f'config.autoencoder.path={path!r}: no such folder')


def make(autoencoder_config, load_weights: bool = True):
  """The autoencoder of `config.autoencoder`. A VAE's weights are read here (on the default device);
  with `load_weights=False` only its config.json is, and `params` are shapes (for validation,
  abstract models and ahead-of-time compiles)."""
  validate(autoencoder_config)
  if autoencoder_config.kind == 'identity':
    return Identity()
  from sora_jax.models import vae_convert  # pylint: disable=g-import-not-at-top
  try:
    model = vae_convert.load_wan(autoencoder_config.path, abstract=not load_weights)
  except UsageError as e:
    raise UsageError(f'config.autoencoder.path: {e}') from None
  return PretrainedVAE(model, autoencoder_config.path)

