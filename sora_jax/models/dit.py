"""A diffusion transformer over spacetime patches (DiT with adaLN-Zero, cross-attention to text).

Shape letters: b batch, t h w latent frames/height/width (in patches after patchify), c latent
channels, p values per patch (pt*ph*pw*c), s = t*h*w tokens, d width, l text tokens.

Inputs: a noisy latent video x_bthwc, the flow time t_b in [0, 1], and text embeddings with
their mask. Positions (t, h, w) of each token are explicit so that packing can come later.

`conditioning='class'` gives instead the class-conditional image DiT of Peebles & Xie (2023),
parameter for parameter (configs/imagenet_dit.py): a label table with a null class, no text, no
cross-attention, no QK-norm, no RoPE, qkv biases, and "learned sigma" outputs (see `DiT`).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import layers
from sora_jax.models.axes import constrain, param
from sora_jax.text.byte import ByteTextEncoder

# ----------------------------------------------------------------------------------------------
# Patchify (pure functions).
# ----------------------------------------------------------------------------------------------


def still_frames(frames: int, patch_t: int) -> int:
  """The frames a clip patchifies as: an image (one frame) is a still clip of `patch_t` frames, so
  one model with a temporal patch > 1 takes images too; other clips keep their own."""
  return patch_t if frames == 1 else frames


def repeat_stills(x_bthwc, patch_t: int):
  """[b, 1, H, W, c] (images) -> [b, patch_t, H, W, c] (still clips); other clips unchanged.
  (numpy or jax arrays)"""
  if x_bthwc.shape[1] != 1 or patch_t == 1:
    return x_bthwc
  xp = np if isinstance(x_bthwc, np.ndarray) else jnp
  return xp.repeat(x_bthwc, patch_t, axis=1)


def patchify(x_bthwc, patch: tuple[int, int, int]):
  """[b, T, H, W, c] -> [b, s, p] with tokens in (t, h, w) raster order and p = pt*ph*pw*c.
  (numpy or jax arrays: the input pipeline packs with it too)"""
  b, T, H, W, c = x_bthwc.shape
  pt, ph, pw = patch
  if T % pt or H % ph or W % pw:
    raise ValueError(f'patch size {patch} does not divide the latent video {(T, H, W)}')
  x = x_bthwc.reshape(b, T // pt, pt, H // ph, ph, W // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # b t h w pt ph pw c
  return x.reshape(b, (T // pt) * (H // ph) * (W // pw), pt * ph * pw * c)


def unpatchify(x_bsp, patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int):
  """Inverse of `patchify`: [b, s, p] -> [b, T, H, W, c] for a token grid (t, h, w)."""
  b = x_bsp.shape[0]
  pt, ph, pw = patch
  t, h, w = grid
  x = x_bsp.reshape(b, t, h, w, pt, ph, pw, channels)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # b t pt h ph w pw c
  return x.reshape(b, t * pt, h * ph, w * pw, channels)


def grid_positions(grid: tuple[int, int, int]):
  """[s, 3] int32 (t, h, w) coordinates of the tokens of a grid, in patchify order (numpy: a constant)."""
  t, h, w = grid
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing='ij')
  return np.stack([tt, hh, ww], axis=-1).reshape(-1, 3).astype(np.int32)


def sincos_position_embedding(pos_bsa, dim: int, max_period: float = 10000.0):
  """Fixed absolute position features [b, s, dim]: sin/cos of each position axis in its own block.

  RoPE only tells attention about offsets. From pure noise (t near 1) the network must still place
  the object and its motion in absolute coordinates, which this gives it directly.
  """
  dims = layers.rope_dims(dim, pos_bsa.shape[-1])
  feats = []
  for axis, d in enumerate(dims):
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(d // 2, dtype=jnp.float32) / (d // 2))
    angle = pos_bsa[..., axis:axis + 1].astype(jnp.float32) * freqs
    feats += [jnp.sin(angle), jnp.cos(angle)]
  return jnp.concatenate(feats, axis=-1)


def timestep_embedding(t_b, dim: int, max_period: float = 10000.0):
  """Sinusoidal features [b, dim] of t in [0, 1] (scaled by 1000 as in DiT)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t_b.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------------------------


class DiTBlock(nnx.Module):
  """Self-attention (3D RoPE) and MLP modulated by adaLN-Zero; cross-attention to text in between.

  At initialisation the adaLN gates are zero, so the self-attention and MLP branches add nothing.
  `text_dim=None` leaves out the cross-attention (class-conditional DiT); `rope=False` drops RoPE
  from the self-attention (then `pos_bs3` is unused).
  """

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, text_dim: int | None, rngs: nnx.Rngs,
               dtype, attention_impl, sequence_parallel='all_to_all', qk_norm: bool = True,
               qkv_bias: bool = False, rope: bool = True, rope_theta: float = 10000.0,
               rope_position_scale: float = 1.0):
    kw = dict(rngs=rngs, dtype=dtype, implementation=attention_impl)
    self.self_attn = layers.Attention(dim, num_heads, sequence_parallel=sequence_parallel,
                                      qk_norm=qk_norm, qkv_bias=qkv_bias, rope_theta=rope_theta,
                                      rope_position_scale=rope_position_scale, **kw)
    self.rope = rope
    self.cross_attention = text_dim is not None
    if self.cross_attention:
      self.cross_norm = layers.RMSNorm(dim, 'embed', rngs=rngs)
      # Not zero-initialised: a zero output projection starves queries and keys of gradient, and
      # cross-attention then never learns to look past what the pooled caption already gives.
      self.cross_attn = layers.Attention(dim, num_heads, context_dim=text_dim, **kw)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dtype=dtype)
    self.modulation = layers.Dense(dim, 6 * dim, ('embed', 'mlp'), rngs=rngs, zero=True, dtype=dtype)

  def __call__(self, x_bsd, c_bd, pos_bs3, text_bld=None, text_mask_bl=None, segment_bs=None,
               text_segment_bl=None, layout=None):
    """Packed rows (see `DiT.forward_packed`): c [b, n, d] per segment, segment_bs [b, s] (1..n, 0
    padding), text_segment_bl [b, l] the segment of each text token (0 padding), `layout` how the
    rows are laid out (`layers.PackedLayout`) or None."""
    block = 1 if layout is None else layout.block
    mod = per_token(self.modulation(jax.nn.silu(c_bd)), segment_bs, block)  # [b, 6d] or [b, s, 6d]
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, -1)
    gate1, gate2 = (g[:, None] if g.ndim == 2 else g for g in (gate1, gate2))
    h = self.self_attn(layers.modulate(layers.layer_norm(x_bsd), shift1, scale1),
                       pos_bsa=pos_bs3 if self.rope else None, segment_bs=segment_bs, layout=layout)
    x_bsd = x_bsd + gate1 * h
    if self.cross_attention:
      x_bsd = x_bsd + self.cross_attn(self.cross_norm(x_bsd), context_bld=text_bld, mask_bl=text_mask_bl,
                                      segment_bs=segment_bs, context_segment_bl=text_segment_bl, layout=layout)
    h = self.mlp(layers.modulate(layers.layer_norm(x_bsd), shift2, scale2))
    x_bsd = x_bsd + gate2 * h
    return constrain(x_bsd, ('act_batch', 'act_seq', 'act_embed'))


def per_token(values_bnx, segment_bs, block: int = 1):
  """Per-segment values [b, n, x] -> each token's [b, s, x] (segment ids 1..n; padding takes segment
  1's, unused). Without segments (segment_bs None), values [b, x] are one per sample: unchanged.
  `block` > 1: every `block` tokens from the row's start are one segment's (`layers.PackedLayout`),
  so the values are gathered per block and broadcast over its tokens, a broadcast XLA fuses into
  its use: no [b, s, x] gather (on the native config's step, 4% of its time here)."""
  if segment_bs is None:
    return values_bnx
  b, s = segment_bs.shape
  index = jnp.maximum(segment_bs[:, ::block] - 1, 0)[..., None]  # [b, s / block, 1]
  values = jnp.take_along_axis(values_bnx, index, axis=1, mode='clip')  # a bad id never gives NaN
  if block == 1:
    return values
  return jnp.broadcast_to(values[:, :, None], (b, s // block, block, values.shape[-1])).reshape(b, s, -1)


class FinalLayer(nnx.Module):
  def __init__(self, dim: int, patch_values: int, *, rngs: nnx.Rngs, dtype):
    self.modulation = layers.Dense(dim, 2 * dim, ('embed', 'mlp'), rngs=rngs, zero=True, dtype=dtype)
    self.proj = layers.Dense(dim, patch_values, ('embed', 'patch'), rngs=rngs, zero=True, dtype=dtype)

  def __call__(self, x_bsd, c_bd, segment_bs=None, block: int = 1):
    shift, scale = jnp.split(per_token(self.modulation(jax.nn.silu(c_bd)), segment_bs, block), 2, -1)
    return self.proj(layers.modulate(layers.layer_norm(x_bsd), shift, scale))


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------

# What the backward pass may keep of each block's forward (config.model.remat); the rest is recomputed.
REMAT_POLICIES = {
    'none': None,  # keep everything: fastest, most memory
    'full': jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projection and MLP outputs
}



CONDITIONING = ('text', 'class')


class DiT(nnx.Module):
  """Text-conditioned DiT that owns the built-in text encoder, so both train together; or with
  `conditioning='class'`, the class-conditional DiT of Peebles & Xie (2023).

  Text:  __call__(x_bthwc, t_b, tokens_bl, token_mask_bl) with the built-in byte encoder, or
         __call__(x_bthwc, t_b, text_bld=..., text_mask_bl=...) with `text_dim` set: embeddings of
         a frozen pretrained encoder (T5, `sora_jax.text`) computed outside the DiT.
  Class: __call__(x_bthwc, t_b, labels_b=labels_b), labels_b int [b] in [0, num_classes]; the
         label `num_classes` (`DiT.null_label`) is the null class for classifier-free guidance:
         callers drop labels to it in training and pass it for the unconditional branch.
  Frame conditioning (`frame_conditioning=True`): `frame_mask_bt` (bool [b, T]) marks the frames
         given clean (image-to-video, extension, ...) with a learned embedding; no mask, or an
         all-False one, is plain generation (`sora_jax.diffusion.frame_conditioning`).
  `text_embedding_std`: the built-in byte encoder's initial embedding scale (`ByteTextEncoder`).
  -> prediction [b, T, H, W, c] (x0 or velocity, as the objective chooses; the network does not care).

  The class model's options, each defaulting to the text model's behaviour: `qk_norm`, `qkv_bias`,
  `rope` (without it, positions are the fixed sin-cos features only) and `learn_sigma`. With
  `learn_sigma` the final layer predicts 2c channels per value as DiT's does (its second half was
  the variance of the DDPM posterior); `__call__` returns the first c only, so the extra outputs get
  no gradient from the rectified-flow loss (SiT keeps the same layout). They are kept so that the
  parameter count, the FLOPs and the checkpoint layout equal the paper's.
  """

  def __init__(self, *, channels: int, patch: tuple[int, int, int], width: int, depth: int,
               num_heads: int, mlp_ratio: float = 4.0, text_width: int = 128, text_depth: int = 2,
               text_heads: int = 4, pooled_text: bool = True, absolute_positions: bool = True,
               rope_theta: float = 10000.0, rope_position_scale: float = 1.0, remat: str = 'none',
               dtype=jnp.float32, attention_impl: str | None = None,
               sequence_parallel: str = 'all_to_all', conditioning: str = 'text',
               num_classes: int | None = None, qk_norm: bool = True, qkv_bias: bool = False,
               rope: bool = True, learn_sigma: bool = False, text_dim: int | None = None,
               frame_conditioning: bool = False, text_embedding_std: float = 0.02, rngs: nnx.Rngs):
    self.patch = tuple(patch)
    self.channels = channels
    if conditioning not in CONDITIONING:
      raise ValueError(f'conditioning={conditioning!r}: use one of {CONDITIONING}')
    if conditioning == 'class' and not (isinstance(num_classes, int) and num_classes > 0):
      raise ValueError(f'conditioning="class" needs a positive num_classes, got {num_classes!r}')
    self.conditioning = conditioning
    self.num_classes = num_classes if conditioning == 'class' else None
    self.pooled_text = pooled_text and conditioning == 'text'
    self.absolute_positions = absolute_positions
    self.learn_sigma = learn_sigma
    if remat not in REMAT_POLICIES:
      raise ValueError(f'remat={remat!r}: use one of {tuple(REMAT_POLICIES)}')
    self.remat = remat
    patch_values = math.prod(self.patch) * channels
    self.external_text = conditioning == 'text' and text_dim is not None
    if conditioning == 'text' and not self.external_text:
      self.text_encoder = ByteTextEncoder(text_width, text_depth, text_heads, rngs=rngs, dtype=dtype,
                                          embedding_std=text_embedding_std)
    self.patch_embed = layers.Dense(patch_values, width, ('patch', 'embed'), rngs=rngs, dtype=dtype)
    self.frame_conditioning = frame_conditioning
    if frame_conditioning:  # marks given frames: one row per frame position inside a patch
      self.given_frame_embed = param(rngs, layers.init_normal(0.02), (self.patch[0], width), ('pos', 'embed'))
    self.time_mlp1 = layers.Dense(256, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype)
    self.time_mlp2 = layers.Dense(width, width, ('mlp', 'embed'), rngs=rngs, dtype=dtype)
    if conditioning == 'text':
      self.text_proj = layers.Dense(text_dim or text_width, width, ('text_embed', 'embed'), rngs=rngs, dtype=dtype)
    else:  # one row per class and a last one for the null class; DiT's init (normal, std 0.02)
      self.label_embedding = param(rngs, layers.init_normal(0.02), (num_classes + 1, width), ('classes', 'embed'))
    if self.pooled_text:  # attention pooling: learned queries pick the words that matter
      self.pool_query = param(rngs, layers.init_normal(0.02), (1, width), ('pos', 'embed'))
      self.pool_attn = layers.Attention(width, num_heads, rngs=rngs, dtype=dtype,  # one query: XLA's
                                        query_axis=None)
      self.pool_mlp = layers.Mlp(width, width, rngs=rngs, dtype=dtype, token_axis=None)
    self.blocks = nnx.List([
        DiTBlock(width, num_heads, mlp_ratio, text_dim=width if conditioning == 'text' else None,
                 rngs=rngs, dtype=dtype, attention_impl=attention_impl,
                 sequence_parallel=sequence_parallel, qk_norm=qk_norm, qkv_bias=qkv_bias, rope=rope,
                 rope_theta=rope_theta, rope_position_scale=rope_position_scale)
        for _ in range(depth)])
    self.final = FinalLayer(width, patch_values * (2 if learn_sigma else 1), rngs=rngs, dtype=dtype)

  @property
  def null_label(self) -> int:
    """The label of the null class (classifier-free guidance) of a class-conditional model."""
    if self.conditioning != 'class':
      raise ValueError('a text-conditioned DiT has no null label: use the empty caption')
    return self.num_classes

  def encode_text(self, tokens_bl, mask_bl):
    text_bld, mask_bl = self.text_encoder(tokens_bl, mask_bl)
    return self.text_proj(text_bld), mask_bl

  def __call__(self, x_bthwc, t_b, tokens_bl=None, token_mask_bl=None, *, labels_b=None, text_bld=None,
               text_mask_bl=None, frame_mask_bt=None):
    b, T, H, W, c = x_bthwc.shape
    if c != self.channels:
      raise ValueError(f'the DiT was built for {self.channels} latent channels, got an input with {c}')
    given = {name for name, v in (('tokens', tokens_bl), ('token_mask', token_mask_bl), ('labels', labels_b),
                                  ('text', text_bld), ('text_mask', text_mask_bl)) if v is not None}
    wanted = ({'labels'} if self.conditioning == 'class' else
              {'text', 'text_mask'} if self.external_text else {'tokens', 'token_mask'})
    if given != wanted:
      raise ValueError(f'this DiT takes {sorted(wanted)} as its condition, got {sorted(given)}')
    grid = (T // self.patch[0], H // self.patch[1], W // self.patch[2])
    pos_bs3 = jnp.broadcast_to(grid_positions(grid)[None], (b, math.prod(grid), 3))
    x_bsd = self.patch_embed(patchify(x_bthwc, self.patch))
    if frame_mask_bt is not None:  # given (clean) frames: add their learned mark to their tokens
      if not self.frame_conditioning:
        raise ValueError('frame_mask_bt needs a DiT built with frame_conditioning=True')
      mask_btp = frame_mask_bt.astype(x_bsd.dtype).reshape(b, grid[0], self.patch[0])
      mark_btd = mask_btp @ self.given_frame_embed[...].astype(x_bsd.dtype)
      x_bsd = x_bsd + jnp.repeat(mark_btd, grid[1] * grid[2], axis=1)  # tokens are t-major
    if self.absolute_positions:
      pos_bsa = pos_bs3
      if self.conditioning == 'class' and grid[0] == 1:
        # Images: DiT's 2D sin-cos table exactly, its first half from w and its second from h.
        pos_bsa = pos_bs3[..., ::-1][..., :2]
      x_bsd = x_bsd + sincos_position_embedding(pos_bsa, x_bsd.shape[-1]).astype(x_bsd.dtype)
    x_bsd = constrain(x_bsd, ('act_batch', 'act_seq', 'act_embed'))
    c_bd = self.time_mlp2(jax.nn.silu(self.time_mlp1(timestep_embedding(t_b, 256))))
    if self.conditioning == 'class':
      c_bd = c_bd + jnp.take(self.label_embedding[...], labels_b, axis=0).astype(c_bd.dtype)
    elif self.external_text:
      text_bld = self.text_proj(text_bld)
    else:
      text_bld, text_mask_bl = self.encode_text(tokens_bl, token_mask_bl)
    if self.pooled_text:  # a summary of the caption in the adaLN condition steers every token
      query_b1d = jnp.broadcast_to(self.pool_query[None], (b, 1, self.pool_query.shape[-1]))
      pooled_b1d = self.pool_attn(query_b1d, context_bld=text_bld, mask_bl=text_mask_bl)
      c_bd = c_bd + self.pool_mlp(pooled_b1d)[:, 0]
    apply = lambda block, *args: block(*args)
    if self.remat != 'none':
      apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x_bsd = apply(block, x_bsd, c_bd, pos_bs3, text_bld, text_mask_bl)
    out_bsp = self.final(x_bsd, c_bd)
    if self.learn_sigma:  # values (pt, ph, pw, 2c) as in DiT; the second c (its variance) is unused
      return unpatchify(out_bsp, self.patch, grid, 2 * c)[..., :c].astype(jnp.float32)
    return unpatchify(out_bsp, self.patch, grid, c).astype(jnp.float32)


  def forward_packed(self, x_bsp, t_bn, segment_bs, pos_bs3, tokens_bnl=None, token_mask_bnl=None, *,
                     text_bnld=None, text_mask_bnl=None, frame_mask_bsk=None, layout=None):
    """Packed rows of a text DiT: the patch tokens of up to n samples (clips or images of any size).

    x_bsp [b, s, p] patch values (`patchify` of each sample, concatenated, then padding);
    segment_bs int [b, s]: 1..n, the sample of each token, 0 for padding; pos_bs3 [b, s, 3] each
    token's (t, h, w) inside its own sample; per sample (n slots per row; unused ones need a finite
    t and any caption): t_bn, and its caption (tokens_bnl/token_mask_bnl, or text_bnld/text_mask_bnl);
    frame_mask_bsk bool [b, s, patch_t] the given frames inside each token (frame conditioning).
    Self-attention stays inside a sample, cross-attention goes to its own caption, and the
    timestep and caption modulate its tokens only: each sample's output equals `__call__` on it
    alone. `layout` (block, window): every sample starts at a multiple of `block` tokens (`packing.pack(
    align=block)`) and has at most `window`, so attention skips other samples' tokens
    (`layers.PackedLayout`); None attends over whole rows, masked (any layout).
    -> prediction [b, s, p] (padding tokens: garbage, for the loss to skip).
    Class-conditional DiTs are not packed yet (their images use DiT's 2D position table).
    """
    if self.conditioning == 'class':
      raise ValueError('forward_packed: packing class-conditional DiTs is not supported yet')
    if frame_mask_bsk is not None and not self.frame_conditioning:
      raise ValueError('frame_mask_bsk needs a DiT built with frame_conditioning=True')
    b, s, _ = x_bsp.shape
    n = t_bn.shape[1]
    x_bsd = self.patch_embed(x_bsp)
    if frame_mask_bsk is not None:
      x_bsd = x_bsd + frame_mask_bsk.astype(x_bsd.dtype) @ self.given_frame_embed[...].astype(x_bsd.dtype)
    if self.absolute_positions:
      x_bsd = x_bsd + sincos_position_embedding(pos_bs3, x_bsd.shape[-1]).astype(x_bsd.dtype)
    x_bsd = constrain(x_bsd, ('act_batch', 'act_seq', 'act_embed'))
    c_bnd = self.time_mlp2(jax.nn.silu(self.time_mlp1(timestep_embedding(t_bn.reshape(-1), 256))))
    c_bnd = c_bnd.reshape(b, n, -1)
    # Each slot's caption on its own; the row's cross-attention context is all of them, by segment.
    if self.external_text:
      text_xld, mask_xl = self.text_proj(text_bnld.reshape(b * n, *text_bnld.shape[2:])), text_mask_bnl
    else:
      text_xld, mask_xl = self.encode_text(tokens_bnl.reshape(b * n, -1), token_mask_bnl.reshape(b * n, -1))
    mask_xl = mask_xl.reshape(b * n, -1)
    if self.pooled_text:
      query_x1d = jnp.broadcast_to(self.pool_query[None], (b * n, 1, self.pool_query.shape[-1]))
      pooled_x1d = self.pool_attn(query_x1d, context_bld=text_xld, mask_bl=mask_xl)
      c_bnd = c_bnd + self.pool_mlp(pooled_x1d)[:, 0].reshape(b, n, -1)
    l = mask_xl.shape[1]
    text_bld = text_xld.reshape(b, n * l, -1)
    slot_bnl = jnp.broadcast_to(jnp.arange(1, n + 1)[None, :, None], (b, n, l))
    text_segment_bl = jnp.where(mask_xl.reshape(b, n, l), slot_bnl, 0).reshape(b, n * l)
    layout = None if layout is None else layers.PackedLayout(*tuple(layout)[:2], slots=n)
    apply = lambda block, *args: block(*args, layout=layout)  # static: bound here, not traced by remat
    if self.remat != 'none':
      apply = nnx.remat(apply, policy=REMAT_POLICIES[self.remat])
    for block in self.blocks:
      x_bsd = apply(block, x_bsd, c_bnd, pos_bs3, text_bld, None, segment_bs, text_segment_bl)
    out_bsp = self.final(x_bsd, c_bnd, segment_bs, 1 if layout is None else layout.block)
    if self.learn_sigma:
      out_bsp = out_bsp.reshape(b, s, -1, 2 * self.channels)[..., :self.channels].reshape(b, s, -1)
    return out_bsp.astype(jnp.float32)


def is_class_conditional(model_config) -> bool:
  """Whether `config.model` is a class-conditional DiT (labels) rather than a text one (the default)."""
  return model_config.get('conditioning', 'text') == 'class'


def from_config(model_config, channels: int, rngs: nnx.Rngs, text_dim: int | None = None) -> DiT:
  """The DiT described by `config.model` for a latent with `channels` channels (the autoencoder's),
  unless `config.model.channels` names another count, and for the embeddings of a frozen text
  encoder of width `text_dim` (`sora_jax.text.text_dim(config)`; None: the built-in byte encoder).

  Fields a config may leave out take the text model's defaults, so older configs and checkpoints
  build the same model: `conditioning` ('text'), `num_classes`, `qk_norm` (True), `qkv_bias`
  (False), `rope` (True), `learn_sigma` (False), `frame_conditioning` (False), `remat`,
  `sequence_parallel`; the text fields
  are only read by the text model.
  """
  get = model_config.get
  return DiT(channels=get('channels') or channels, patch=tuple(model_config.patch), width=model_config.width,
             depth=model_config.depth, num_heads=model_config.num_heads,
             mlp_ratio=model_config.mlp_ratio, text_width=get('text_width', 128),
             text_depth=get('text_depth', 2), text_heads=get('text_heads', 4),
             pooled_text=get('pooled_text', True), absolute_positions=get('absolute_positions', True),
             rope_theta=get('rope_theta', 10000.0), rope_position_scale=get('rope_position_scale', 1.0),
             remat=get('remat', 'none'),
             dtype=jnp.dtype(model_config.dtype), attention_impl=get('attention_impl', None),
             sequence_parallel=get('sequence_parallel', 'all_to_all'),
             conditioning=get('conditioning', 'text'), num_classes=get('num_classes', None),
             qk_norm=get('qk_norm', True), qkv_bias=get('qkv_bias', False), rope=get('rope', True),
             learn_sigma=get('learn_sigma', False), text_dim=text_dim,
             frame_conditioning=get('frame_conditioning', False),
             text_embedding_std=get('text_embedding_std', 0.02), rngs=rngs)


def forward_flops_per_sample(model_config, latent_thw: tuple[int, int, int], channels: int,
                             text_len: int = 0, text_dim: int | None = None) -> int:
  """Matmul FLOPs (2 per multiply-add, attention included) of one forward pass for one sample.

  Elementwise work (norms, RoPE, softmax, GELU) is left out, as in MFU conventions; a train
  step costs 3x this (the backward pass is two matmuls per forward matmul). The DiT paper's
  "Gflops" count multiply-adds: half of this. `text_len` is unused by a class-conditional model
  (its label lookup costs no matmul); `channels` is the autoencoder's, as for `from_config`. With a
  frozen text encoder (`text_dim`), its forward pass is not counted: only the DiT's projection.
  """
  m = model_config
  s = math.prod(n // p for n, p in zip(latent_thw, m.patch))  # spacetime tokens
  d, f = m.width, int(m.width * m.mlp_ratio)
  values = math.prod(m.patch) * (m.get('channels') or channels)
  out_values = values * (2 if m.get('learn_sigma', False) else 1)

  def attention(queries, keys, dim, context_dim):  # projections + scores + weighted values
    return 2 * (queries * dim * dim * 2 + keys * context_dim * dim * 2) + 4 * queries * keys * dim

  cond = 2 * 256 * d + 2 * d * d
  block = 2 * d * 6 * d + attention(s, s, d, d) + 2 * 2 * s * d * f
  if not is_class_conditional(m):
    l, e = text_len, m.text_width
    if text_dim:
      text = 2 * l * text_dim * d
    else:
      text = m.text_depth * (attention(l, l, e, e) + 2 * 2 * l * e * 4 * e) + 2 * l * e * d
    if m.pooled_text:
      cond += attention(1, l, d, d) + 2 * 2 * d * d
    block += attention(s, l, d, d)
  else:
    text = 0
  final = 2 * d * 2 * d + 2 * s * d * out_values
  return 2 * s * values * d + text + cond + m.depth * block + final
