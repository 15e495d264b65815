"""Autoencoders map pixels [b, T, H, W, 3] in [-1, 1] to the latent the DiT denoises, and back.

`identity` trains in pixel space (the embedded default). A causal 3D VAE fills the same
interface later: `encode`, `decode`, `latent_shape`, `channels`.
"""

from sora_jax import UsageError


class Identity:
  channels = 3

  def encode(self, video_bthwc):
    return video_bthwc

  def decode(self, latent_bthwc):
    return latent_bthwc

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    return frames, height, width


def make(autoencoder_config):
  if autoencoder_config.kind == 'identity':
    return Identity()
  raise UsageError(f'config.autoencoder.kind={autoencoder_config.kind!r}: only "identity" is available')
