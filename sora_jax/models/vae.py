"""A causal 3D-convolutional video VAE (the Wan 2.1 architecture), channels-last.

Shape letters: b batch, T H W frames/height/width, c channels; videos are [b, T, H, W, 3] in [-1, 1].

Time is causal: every temporal convolution pads only the past (with zeros), so a frame's latent
never depends on later frames. Each temporal downsampling keeps the first frame on its own and
strides 2 over the rest, so T = 1 + 4n frames become 1 + n latent frames (x4 with two temporal
stages) and an image is simply a one-frame video. Space is compressed x2 per stage (x8 by default),
after an optional p x p patchify (`patch_size`, as in Wan 2.2's VAE); a stage may compress time only
(`spatial_downsample`). With `shortcuts` (for VAEs trained here), parameter-free paths run beside the
learned ones, as in Wan 2.2's VAE and DC-AE: each resampling stage adds its input folded
(space and time into channels, averaged: causal average pooling) on the way down, or unfolded
(channels repeated into space and time: nearest upsampling) on the way up, and channel means or
repeats carry the pixels into the first convolution, the stream into the latent mean and back
out, so an untrained VAE already passes a pooled clip through and training starts from there.

This is the computation of diffusers' `AutoencoderKLWan` (which runs the same network chunk by
chunk with feature caches), on the whole clip at once: convolutions over a zero-padded past equal
chunked convolutions over cached frames. The parameter tree mirrors diffusers' module names, so
`vae_convert.py` maps an exported folder one tensor to one parameter.

The encoder gives a diagonal Gaussian (mean, log-variance) per latent value; the DiT's latent is
its mean (or a sample), normalised per channel by `latents_mean` / `latents_std`.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models import dit
from sora_jax.models.axes import param

# ----------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  base_dim: int = 96
  z_dim: int = 16  # latent channels
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channels per stage: base_dim * mult; len - 1 resampling stages
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)  # per stage; x2 in time where True
  spatial_downsample: tuple[bool, ...] | None = None  # per stage; x2 in space where True (None: every stage)
  patch_size: int = 1  # p x p pixels -> channels before the encoder (and back after the decoder)
  decoder_base_dim: int | None = None
  # Parameter-free shortcuts beside the learned layers (see the module docstring; Wan 2.2, DC-AE):
  # untrained, the VAE is causal average pooling down and nearest upsampling up. Not in Wan 2.1.
  shortcuts: bool = False
  in_channels: int = 3
  latents_mean: tuple[float, ...] | None = None  # per channel: the DiT sees (z - mean) / std
  latents_std: tuple[float, ...] | None = None

  def __post_init__(self):
    if len(self.temporal_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f'temporal_downsample has {len(self.temporal_downsample)} entries, expected one per '
                       f'downsampling stage ({len(self.dim_mult) - 1})')
    if self.spatial_downsample is not None and len(self.spatial_downsample) != len(self.dim_mult) - 1:
      raise ValueError(f'spatial_downsample has {len(self.spatial_downsample)} entries, expected one per '
                       f'downsampling stage ({len(self.dim_mult) - 1})')
    if self.patch_size < 1:
      raise ValueError(f'patch_size={self.patch_size}: must be >= 1')
    for name in ('latents_mean', 'latents_std'):
      value = getattr(self, name)
      if value is not None and len(value) != self.z_dim:
        raise ValueError(f'{name} has {len(value)} entries, expected z_dim={self.z_dim}')

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  @property
  def spatial_stages(self) -> tuple[bool, ...]:
    if self.spatial_downsample is None:
      return (True,) * (len(self.dim_mult) - 1)
    return tuple(self.spatial_downsample)

  @property
  def spatial_factor(self) -> int:
    return self.patch_size * 2 ** sum(self.spatial_stages)

  def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (T, H, W) of a clip; raises for sizes the network cannot take."""
    tf, sf = self.temporal_factor, self.spatial_factor
    if (frames - 1) % tf or height % sf or width % sf:
      raise ValueError(f'a clip of {frames} x {height} x {width}: frames must be 1 + {tf}n and height and '
                       f'width multiples of {sf}')
    return 1 + (frames - 1) // tf, height // sf, width // sf


# ----------------------------------------------------------------------------------------------
# Streaming: a long clip in chunks, each temporal convolution carrying its past frames over.
# ----------------------------------------------------------------------------------------------


class Stream:
  """The carried state of one chunk: the cached input frames of every temporal convolution, in
  call order (a list, so a jitted chunk function takes and returns it as a pytree).

  `caches=None` starts a clip: the chunk then holds frame 0, which the temporal resamplers keep
  on its own, and every convolution pads its past with zeros, as on the whole clip.
  """

  def __init__(self, caches: list | None = None):
    self.first = caches is None
    self._old = caches
    self.new = []

  def exchange(self, keep):
    """The cache this call left last chunk (None in the first); stores `keep` for the next."""
    old = None if self._old is None else self._old[len(self.new)]
    self.new.append(keep)
    return old


# ----------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------


def _conv_init():
  return nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=-2, out_axis=-1)


class CausalConv3d(nnx.Module):
  """3D convolution, zero padding in space and only on the past side in time. `stride_t=2` with
  `pad_t=0` is the temporal downsampler's valid, strided convolution."""

  def __init__(self, c_in: int, c_out: int, kernel=(3, 3, 3), *, rngs: nnx.Rngs, stride_t: int = 1,
               pad_t: int | None = None):
    kt, kh, kw = kernel
    self.kernel = param(rngs, _conv_init(), (kt, kh, kw, c_in, c_out),
                        (None, None, None, 'conv_in', 'conv_out'))
    self.bias = param(rngs, nnx.initializers.zeros_init(), (c_out,), ('conv_out',))
    self.pad_t = kt - 1 if pad_t is None else pad_t
    self.stride_t = stride_t

  def __call__(self, x_bthwc, stream: Stream | None = None):
    _, kh, kw, _, _ = self.kernel.shape
    pad_t = self.pad_t
    if stream is not None and pad_t:  # the past comes from the previous chunk (zeros before frame 0)
      cache = stream.exchange(None)
      if cache is not None:
        x_bthwc = jnp.concatenate([cache, x_bthwc], axis=1)
        pad_t -= cache.shape[1]
      stream.new[-1] = x_bthwc[:, -self.pad_t:]
    x_bthwc = jnp.pad(x_bthwc, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    # A sum of per-frame 2D convolutions, one per temporal tap: XLA:CPU runs 3D convolutions about
    # 3x slower than this (forward and backward); the result is the same convolution.
    b, t, h, w, c = x_bthwc.shape
    kt = self.kernel.shape[0]
    t_out = (t - kt) // self.stride_t + 1
    if t_out <= 0:  # e.g. the temporal downsampler on frame 0 alone
      return jnp.zeros((b, 0, h, w, self.kernel.shape[-1]), x_bthwc.dtype)
    kernel = self.kernel[...].astype(x_bthwc.dtype)
    y = 0
    for dt in range(kt):
      frames = x_bthwc[:, dt:dt + self.stride_t * (t_out - 1) + 1:self.stride_t].reshape(b * t_out, h, w, c)
      y = y + jax.lax.conv_general_dilated(frames, kernel[dt], (1, 1), ((kh // 2, kh // 2), (kw // 2, kw // 2)),
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y.reshape(b, t_out, h, w, -1)
    return y + self.bias[...].astype(y.dtype)


class Conv2d(nnx.Module):
  """A per-frame 2D convolution over [b, T, H, W, c]; `padding` as lax takes it."""

  def __init__(self, c_in: int, c_out: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1, padding='SAME'):
    self.kernel = param(rngs, _conv_init(), (kernel, kernel, c_in, c_out),
                        (None, None, 'conv_in', 'conv_out'))
    self.bias = param(rngs, nnx.initializers.zeros_init(), (c_out,), ('conv_out',))
    self.stride = stride
    self.padding = padding

  def __call__(self, x_bthwc):
    b, t, h, w, c = x_bthwc.shape
    y = jax.lax.conv_general_dilated(x_bthwc.reshape(b * t, h, w, c), self.kernel[...].astype(x_bthwc.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = y + self.bias[...].astype(y.dtype)
    return y.reshape(b, t, *y.shape[1:])


class ChannelRMSNorm(nnx.Module):
  """x / |x| * sqrt(c) * gamma over channels (Wan's norm: an L2 normalisation, eps 1e-12)."""

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.gamma = param(rngs, nnx.initializers.ones_init(), (c,), ('conv_out',))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    y = x32 / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1])
    return (y * self.gamma[...]).astype(x.dtype)


class ResidualBlock(nnx.Module):
  def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
    self.norm1 = ChannelRMSNorm(c_in, rngs=rngs)
    self.conv1 = CausalConv3d(c_in, c_out, rngs=rngs)
    self.norm2 = ChannelRMSNorm(c_out, rngs=rngs)
    self.conv2 = CausalConv3d(c_out, c_out, rngs=rngs)
    self.conv_shortcut = CausalConv3d(c_in, c_out, (1, 1, 1), rngs=rngs) if c_in != c_out else None

  def __call__(self, x, stream=None):
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), stream)
    x = self.conv2(jax.nn.silu(self.norm2(x)), stream)
    return x + h


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the pixels of each frame (no mixing across time)."""

  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.norm = ChannelRMSNorm(c, rngs=rngs)
    self.to_qkv = Conv2d(c, 3 * c, 1, rngs=rngs)
    self.proj = Conv2d(c, c, 1, rngs=rngs)

  def __call__(self, x_bthwc, stream=None):
    del stream  # per frame: nothing to carry
    b, t, h, w, c = x_bthwc.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x_bthwc)).reshape(b * t, h * w, 1, 3 * c), 3, axis=-1)
    out = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
    return x_bthwc + self.proj(out)


class Resample(nnx.Module):
  """x2 down- or upsampling in space, and in time for the '3d' modes (first frame kept apart).
  `spatial=False` keeps the size in space (the 3x3 convolution then has stride 1)."""

  def __init__(self, c: int, mode: str, *, rngs: nnx.Rngs, spatial: bool = True):
    self.mode = mode
    self.spatial = spatial
    if mode.startswith('down'):
      # Zero-pad right and bottom by one, then a strided valid 3x3 convolution.
      self.resample = (Conv2d(c, c, 3, rngs=rngs, stride=2, padding=((0, 1), (0, 1))) if spatial
                       else Conv2d(c, c, 3, rngs=rngs))
      if mode == 'downsample3d':
        self.time_conv = CausalConv3d(c, c, (3, 1, 1), rngs=rngs, stride_t=2, pad_t=0)
    else:
      self.resample = Conv2d(c, c // 2, 3, rngs=rngs)
      if mode == 'upsample3d':
        self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1), rngs=rngs)

  def __call__(self, x_bthwc, stream: Stream | None = None):
    first_chunk = stream is None or stream.first  # holds frame 0
    if self.mode == 'upsample3d':
      # Frames after frame 0: a causal conv makes two frames of each (channel halves).
      first, rest = (x_bthwc[:, :1], x_bthwc[:, 1:]) if first_chunk else (x_bthwc[:, :0], x_bthwc)
      if rest.shape[1]:
        b, t, h, w, c = rest.shape
        rest = self.time_conv(rest, stream)
        rest = rest.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
      elif stream is not None:
        stream.exchange(None)  # the conv's cache stays empty: zeros precede frame 1
      x_bthwc = jnp.concatenate([first, rest], axis=1)
    if self.mode.startswith('up') and self.spatial:  # nearest x2 in space
      x_bthwc = jnp.repeat(jnp.repeat(x_bthwc, 2, axis=2), 2, axis=3)
    x_bthwc = self.resample(x_bthwc)
    if self.mode == 'downsample3d':  # frame 0 alone, then windows (0,1,2), (2,3,4), ...
      previous = None if stream is None else stream.exchange(x_bthwc[:, -1:])
      if first_chunk:
        x_bthwc = jnp.concatenate([x_bthwc[:, :1], self.time_conv(x_bthwc)], axis=1)
      else:
        x_bthwc = self.time_conv(jnp.concatenate([previous, x_bthwc], axis=1))
    return x_bthwc


def fold_shortcut(x_bthwc, ft: int, fs: int, c_out: int, first_chunk: bool = True):
  """[b, T, H, W, c] -> [b, T/ft, H/fs, W/fs, c_out] without parameters: each ft x fs x fs block
  becomes channels (c, then its offsets), averaged over consecutive groups (or repeated) to `c_out`.
  The first chunk's past is zero-padded to a multiple of ft, so frame 0 stays alone, as in the causal
  downsampler."""
  if first_chunk and x_bthwc.shape[1] % ft:
    x_bthwc = jnp.pad(x_bthwc, ((0, 0), (ft - x_bthwc.shape[1] % ft, 0), (0, 0), (0, 0), (0, 0)))
  b, t, h, w, c = x_bthwc.shape
  x = x_bthwc.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
  return match_channels(x.reshape(b, t // ft, h // fs, w // fs, c * ft * fs * fs), c_out)


def unfold_shortcut(x_bthwc, ft: int, fs: int, c_out: int, first_chunk: bool = True):
  """The inverse layout of `fold_shortcut`: [b, T, H, W, c] -> [b, T*ft (- (ft - 1) for the first
  chunk), H*fs, W*fs, c_out], channels repeated (or averaged) to c_out * ft * fs * fs first."""
  b, t, h, w, _ = x_bthwc.shape
  x = match_channels(x_bthwc, c_out * ft * fs * fs).reshape(b, t, h, w, c_out, ft, fs, fs)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * ft, h * fs, w * fs, c_out)
  return x[:, ft - 1:] if first_chunk else x


def match_channels(x, c_out: int):
  """[..., c] -> [..., c_out] without parameters: the mean of each run of c // c_out consecutive
  channels (a remainder dropped), or each channel repeated ceil(c_out / c) times (the excess dropped)."""
  c = x.shape[-1]
  if c >= c_out:
    group = c // c_out
    return x[..., :group * c_out].reshape(*x.shape[:-1], c_out, group).mean(-1)
  return jnp.repeat(x, -(-c_out // c), axis=-1)[..., :c_out]


class MidBlock(nnx.Module):
  def __init__(self, c: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(c, c, rngs=rngs), ResidualBlock(c, c, rngs=rngs)])
    self.attentions = nnx.List([AttentionBlock(c, rngs=rngs)])

  def __call__(self, x, stream=None):
    return self.resnets[1](self.attentions[0](self.resnets[0](x, stream)), stream)


# ----------------------------------------------------------------------------------------------
# Encoder, decoder, VAE.
# ----------------------------------------------------------------------------------------------


def patchify(x_bthwc, p: int):
  """[b, T, H, W, c] -> [b, T, H/p, W/p, p*p*c]: each p x p block of pixels becomes one position's
  channels (the DiT's (1, p, p) patches, kept on their grid)."""
  if p == 1:
    return x_bthwc
  b, t, h, w, _ = x_bthwc.shape
  return dit.patchify(x_bthwc, (1, p, p)).reshape(b, t, h // p, w // p, -1)


def unpatchify(x_bthwc, p: int):
  """The inverse of `patchify`."""
  if p == 1:
    return x_bthwc
  b, t, h, w, c = x_bthwc.shape
  return dit.unpatchify(x_bthwc.reshape(b, t * h * w, c), (1, p, p), (t, h, w), c // (p * p))


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dims = [cfg.base_dim * m for m in (1,) + tuple(cfg.dim_mult)]
    self.patch_size = cfg.patch_size
    self.conv_in = CausalConv3d(cfg.in_channels * cfg.patch_size**2, dims[0], rngs=rngs)
    blocks, shortcuts = [], []  # shortcuts: (first block, last block, ft, fs, c_out) per resampling stage
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
      first = len(blocks)
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(c_in, c_out, rngs=rngs))
        c_in = c_out
      if i != len(cfg.dim_mult) - 1:
        blocks.append(Resample(c_out, 'downsample3d' if cfg.temporal_downsample[i] else 'downsample2d', rngs=rngs,
                               spatial=cfg.spatial_stages[i]))
        if cfg.shortcuts:
          shortcuts.append((first, len(blocks) - 1, 1 + cfg.temporal_downsample[i], 1 + cfg.spatial_stages[i], c_out))
    self.down_blocks = nnx.List(blocks)
    self.shortcuts = cfg.shortcuts
    self.stage_shortcuts = tuple(shortcuts)
    self.mid_block = MidBlock(dims[-1], rngs=rngs)
    self.norm_out = ChannelRMSNorm(dims[-1], rngs=rngs)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, rngs=rngs)

  def __call__(self, x, stream=None):
    x = patchify(x, self.patch_size)
    x = self.conv_in(x, stream) + (match_channels(x, self.conv_in.kernel.shape[-1]) if self.shortcuts else 0)
    stage_inputs = {}
    for i, block in enumerate(self.down_blocks):
      stage_inputs[i] = x
      x = block(x, stream)
      for first, last, ft, fs, c_out in self.stage_shortcuts:
        if i == last:
          x = x + fold_shortcut(stage_inputs[first], ft, fs, c_out, stream is None or stream.first)
    x = self.mid_block(x, stream)
    out = self.conv_out(jax.nn.silu(self.norm_out(x)), stream)  # [b, T', H', W', 2 z_dim]: mean, log-variance
    if self.shortcuts:  # into the mean only
      z_dim = out.shape[-1] // 2
      out = out + jnp.concatenate([match_channels(x, z_dim), jnp.zeros_like(out[..., z_dim:])], axis=-1)
    return out


class UpBlock(nnx.Module):
  def __init__(self, c_in: int, c_out: int, num_res_blocks: int, mode: str | None, *, rngs: nnx.Rngs,
               spatial: bool = True, shortcut: bool = False):
    self.resnets = nnx.List([ResidualBlock(c_in if i == 0 else c_out, c_out, rngs=rngs)
                             for i in range(num_res_blocks + 1)])
    self.upsamplers = nnx.List([Resample(c_out, mode, rngs=rngs, spatial=spatial)] if mode else [])
    # (ft, fs, channels out) of the parameter-free shortcut, or None
    self.shortcut = (1 + (mode == 'upsample3d'), 1 + spatial, c_out // 2) if shortcut and mode else None

  def __call__(self, x, stream=None):
    x_in = x
    for resnet in self.resnets:
      x = resnet(x, stream)
    for up in self.upsamplers:
      x = up(x, stream)
    if self.shortcut is not None:
      x = x + unfold_shortcut(x_in, *self.shortcut, stream is None or stream.first)
    return x


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    base = cfg.decoder_base_dim or cfg.base_dim
    mults = tuple(cfg.dim_mult)
    dims = [base * m for m in (mults[-1],) + mults[::-1]]
    temporal_upsample = tuple(cfg.temporal_downsample)[::-1]
    spatial_upsample = cfg.spatial_stages[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], rngs=rngs)
    self.mid_block = MidBlock(dims[0], rngs=rngs)
    blocks = []
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        c_in //= 2  # the previous upsampler halved the channels
      mode, spatial = None, True
      if i != len(mults) - 1:
        mode = 'upsample3d' if temporal_upsample[i] else 'upsample2d'
        spatial = spatial_upsample[i]
      blocks.append(UpBlock(c_in, c_out, cfg.num_res_blocks, mode, rngs=rngs, spatial=spatial,
                            shortcut=cfg.shortcuts))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = ChannelRMSNorm(dims[-1], rngs=rngs)
    self.patch_size = cfg.patch_size
    self.conv_out = CausalConv3d(dims[-1], cfg.in_channels * cfg.patch_size**2, rngs=rngs)
    self.shortcuts = cfg.shortcuts

  def __call__(self, z, stream=None):
    x = self.conv_in(z, stream) + (match_channels(z, self.conv_in.kernel.shape[-1]) if self.shortcuts else 0)
    x = self.mid_block(x, stream)
    for block in self.up_blocks:
      x = block(x, stream)
    out = self.conv_out(jax.nn.silu(self.norm_out(x)), stream)
    if self.shortcuts:
      out = out + match_channels(x, out.shape[-1])
    return unpatchify(out, self.patch_size)


class VideoVAE(nnx.Module):
  """encode: video [b, T, H, W, 3] in [-1, 1] -> (mean, logvar), each [b, 1 + (T-1)/4, H/8, W/8, z_dim];
  decode: latent -> video, clipped to [-1, 1]. `normalize` / `denormalize` apply the latent statistics."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), rngs=rngs)
    self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def encode(self, video_bthwc, stream: Stream | None = None):
    """(mean, logvar). With a `stream`, `video_bthwc` is the next chunk of a clip (see `encode_chunked`)."""
    if stream is None or stream.first:
      self.cfg.latent_shape(*video_bthwc.shape[1:4])  # a clear error for sizes it cannot take
    h = self.quant_conv(self.encoder(video_bthwc, stream))
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z_bthwc, stream: Stream | None = None):
    return jnp.clip(self.decode_unclipped(z_bthwc, stream), -1.0, 1.0)

  def decode_unclipped(self, z_bthwc, stream: Stream | None = None):
    """The decoder's raw output (training: no clipping, so out-of-range pixels still get gradient)."""
    return self.decoder(self.post_quant_conv(z_bthwc), stream)

  def normalize(self, z):
    if self.cfg.latents_mean is None:
      return z
    return (z - jnp.asarray(self.cfg.latents_mean, z.dtype)) / jnp.asarray(self.cfg.latents_std, z.dtype)

  def denormalize(self, z):
    if self.cfg.latents_mean is None:
      return z
    return z * jnp.asarray(self.cfg.latents_std, z.dtype) + jnp.asarray(self.cfg.latents_mean, z.dtype)


# ----------------------------------------------------------------------------------------------
# Long clips in bounded memory.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('graphdef', 'method'))
def _chunk(graphdef, params, x, caches, *, method: str):
  model = nnx.merge(graphdef, params)
  stream = Stream(caches)
  return getattr(model, method)(x, stream), stream.new


def _chunks(total: int, first: int, step: int):
  yield 0, min(first, total)
  for start in range(first, total, step):
    yield start, min(start + step, total)


def encode_chunked(model: VideoVAE, video_bthwc, chunk_frames: int = 16):
  """`model.encode` of a long clip, `chunk_frames` frames at a time after frame 0 (a multiple of
  the temporal factor): memory grows with the chunk, not the clip. Equal to the one-shot encode."""
  tf = model.cfg.temporal_factor
  if chunk_frames <= 0 or chunk_frames % tf:
    raise ValueError(f'chunk_frames={chunk_frames}: use a positive multiple of {tf}')
  model.cfg.latent_shape(*video_bthwc.shape[1:4])
  graphdef, params = nnx.split(model)
  means, logvars, caches = [], [], None
  for start, stop in _chunks(video_bthwc.shape[1], 1 + chunk_frames, chunk_frames):
    (mean, logvar), caches = _chunk(graphdef, params, video_bthwc[:, start:stop], caches, method='encode')
    means.append(mean)
    logvars.append(logvar)
  return jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1)


def decode_chunked(model: VideoVAE, z_bthwc, chunk_latents: int = 4):
  """`model.decode` of a long latent, `chunk_latents` latent frames at a time after latent frame 0.
  Equal to the one-shot decode."""
  if chunk_latents <= 0:
    raise ValueError(f'chunk_latents={chunk_latents}: use a positive number')
  graphdef, params = nnx.split(model)
  videos, caches = [], None
  for start, stop in _chunks(z_bthwc.shape[1], 1 + chunk_latents, chunk_latents):
    video, caches = _chunk(graphdef, params, z_bthwc[:, start:stop], caches, method='decode')
    videos.append(video)
  return jnp.concatenate(videos, axis=1)


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Starts of tiles of `tile` covering [0, size), neighbours overlapping by at least `overlap`."""
  if tile >= size:
    return [0]
  stride = tile - overlap
  starts = list(range(0, size - tile, stride)) + [size - tile]
  return sorted(set(starts))


def _ramp(length: int, start: int, stop: int, size: int, overlap: int) -> jnp.ndarray:
  """Blend weights [length] of a tile at [start, stop) of `size`: linear ramps over the overlaps,
  except at the borders of the whole frame."""
  w = jnp.ones((length,), jnp.float32)
  if overlap <= 0:
    return w
  i = jnp.arange(length, dtype=jnp.float32)
  if start > 0:
    w = jnp.minimum(w, (i + 1) / (overlap + 1))
  if stop < size:
    w = jnp.minimum(w, (length - i) / (overlap + 1))
  return w


def _tiled(fn, x_bthwc, tile: int, overlap: int, scale_in: int, scale_out: int):
  """Applies `fn` to overlapping spatial tiles of `x` (tile and overlap in input pixels, multiples
  of `scale_in`) and blends the outputs (`scale_out` times the input size / `scale_in`) linearly."""
  _, _, H, W, _ = x_bthwc.shape
  out = weight = None
  for top in _tile_starts(H, tile, overlap):
    for left in _tile_starts(W, tile, overlap):
      h, w = min(tile, H), min(tile, W)
      y = fn(x_bthwc[:, :, top:top + h, left:left + w])
      r = scale_out / scale_in
      ot, ol, oh, ow, ov = int(top * r), int(left * r), y.shape[2], y.shape[3], int(overlap * r)
      wy = _ramp(oh, ot, ot + oh, int(H * r), ov)
      wx = _ramp(ow, ol, ol + ow, int(W * r), ov)
      wyx = (wy[:, None] * wx[None, :])[None, None, :, :, None]
      if out is None:
        out = jnp.zeros((y.shape[0], y.shape[1], int(H * r), int(W * r), y.shape[-1]), jnp.float32)
        weight = jnp.zeros((1, 1, int(H * r), int(W * r), 1), jnp.float32)
      out = out.at[:, :, ot:ot + oh, ol:ol + ow].add(y * wyx)
      weight = weight.at[:, :, ot:ot + oh, ol:ol + ow].add(wyx)
  return out / weight


def encode_tiled(model: VideoVAE, video_bthwc, tile: int = 256, overlap: int = 64, chunk_frames: int = 16):
  """The latent mean of a large clip from overlapping spatial tiles of `tile` pixels (each encoded
  in temporal chunks), blended linearly over the overlaps: memory bounded by tile and chunk.
  Not identical to the one-shot encode (convolutions and the per-frame attention see only their
  tile): `tests/test_vae.py` measures the difference."""
  sf = model.cfg.spatial_factor
  if tile % sf or overlap % sf or not 0 <= overlap < tile:
    raise ValueError(f'tile={tile}, overlap={overlap}: use multiples of {sf} with 0 <= overlap < tile')
  return _tiled(lambda x: encode_chunked(model, x, chunk_frames)[0], video_bthwc, tile, overlap, sf, 1)


def decode_tiled(model: VideoVAE, z_bthwc, tile: int = 32, overlap: int = 8, chunk_latents: int = 4):
  """`decode` of a large latent from overlapping latent tiles of `tile` (each decoded in temporal
  chunks), blended linearly over the overlaps in pixel space. Approximate, as `encode_tiled`."""
  if not 0 <= overlap < tile:
    raise ValueError(f'tile={tile}, overlap={overlap}: use 0 <= overlap < tile')
  sf = model.cfg.spatial_factor
  return _tiled(lambda z: decode_chunked(model, z, chunk_latents), z_bthwc, tile, overlap, 1, sf)
