"""Building blocks shared by the DiT and the text encoder: dense, norms, RoPE, attention, MLP.

Shape letters: b batch, s query tokens, l key tokens, d width, n heads, k head dim, f MLP width.
Parameters are float32; each layer computes in `dtype` (float32 or bfloat16).
"""

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from sora_jax.models.axes import constrain, param

init_normal = nnx.initializers.normal
init_zeros = nnx.initializers.zeros_init()
init_ones = nnx.initializers.ones_init()
init_xavier = nnx.initializers.xavier_uniform()


class Dense(nnx.Module):
  """y = x @ W + b over the last axis; `zero=True` gives the zero init of adaLN-Zero layers."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs,
               zero: bool = False, dtype=jnp.float32):
    self.kernel = param(rngs, init_zeros if zero else init_xavier, (d_in, d_out), axes)
    self.bias = param(rngs, init_zeros, (d_out,), (axes[1],))
    self.dtype = dtype

  def __call__(self, x):
    return x.astype(self.dtype) @ self.kernel.astype(self.dtype) + self.bias.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis with a learned scale (used for QK-norm and the text encoder)."""

  def __init__(self, dim: int, axis_name: str = 'norm', *, rngs: nnx.Rngs, eps: float = 1e-6):
    self.scale = param(rngs, init_ones, (dim,), (axis_name,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale).astype(x.dtype)


def layer_norm(x, eps: float = 1e-6):
  """LayerNorm without affine parameters: adaLN supplies the shift and scale."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.var(x32, axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x_bsd, shift, scale):
  """adaLN: shift and scale [b, d] (one per sample) or [b, s, d] (per token, packed rows)."""
  if shift.ndim == 2:
    shift, scale = shift[:, None], scale[:, None]
  return x_bsd * (1 + scale) + shift


# ----------------------------------------------------------------------------------------------
# Rotary position embedding over any number of position axes (t, h, w for video; 1 for text).
# ----------------------------------------------------------------------------------------------

def rope_dims(head_dim: int, num_axes: int) -> tuple[int, ...]:
  """Splits the head dim into one even-sized part per position axis; the first gets the rest."""
  base = (head_dim // num_axes) // 2 * 2
  first = head_dim - base * (num_axes - 1)
  if base == 0 or first % 2:
    raise ValueError(f'head dim {head_dim} cannot be split into {num_axes} even RoPE parts')
  return (first,) + (base,) * (num_axes - 1)


def apply_rope(x_bsnk, pos_bsa, theta: float = 10000.0, position_scale: float = 1.0):
  """Rotates pairs of channels of each head by angles pos * freq, one block of channels per axis.

  x_bsnk: [b, s, n, k] queries or keys.  pos_bsa: [b, s, a] explicit positions (t, h, w), so
  packed or cropped sequences keep their true coordinates. Dot products of rotated q and k depend
  only on position differences. The frequencies per axis run from `position_scale` radians a position
  down to about `position_scale / theta`; the fastest wraps around (looks like no offset) at offsets
  near 2 pi / position_scale (~6 positions at 1).
  """
  dims = rope_dims(x_bsnk.shape[-1], pos_bsa.shape[-1])
  angles = []
  for axis, dim in enumerate(dims):
    freqs = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)  # [dim/2]
    angles.append(pos_bsa[..., axis:axis + 1].astype(jnp.float32) * (position_scale * freqs))  # [b, s, dim/2]
  angle_bsh = jnp.concatenate(angles, axis=-1)[:, :, None, :]  # [b, s, 1, k/2]
  cos, sin = jnp.cos(angle_bsh), jnp.sin(angle_bsh)
  x1, x2 = jnp.split(x_bsnk.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return rotated.astype(x_bsnk.dtype)


# ----------------------------------------------------------------------------------------------
# Attention and MLP.
# ----------------------------------------------------------------------------------------------

SEQUENCE_PARALLEL = ('all_to_all', 'gather_kv', 'xla')


def _mesh_axes(logical_axes, shape) -> list[tuple[str, ...]]:
  """Per dim, the mesh axes an activation is sharded over under the current rules and mesh; axes
  that do not divide their dim are dropped (as `sora_jax.sharding` does for parameters)."""
  mesh = jax.sharding.get_abstract_mesh()
  spec = nn.logical_to_mesh_axes(logical_axes)
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a in mesh.shape)
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(names if names and size > 1 and dim % size == 0 else ())
  return fitted


ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'splash')


def xla_attention(q_bsnk, k_blnk, v_blnk, mask_bnsl=None):
  """softmax(q k^T / sqrt(k)) v, the scores and softmax in float32; mask_bnsl: bool, broadcastable to
  [b, n, s, l], True where a query may see a key (a query that sees no key averages all values).

  The same math as `jax.nn.dot_product_attention(implementation='xla')`, heads-major inside and with
  a hand-written backward pass (`_attention_heads_major`): on this CPU forward + backward takes 0.8x
  its time for 16 clips of 128 tokens and 0.4x for 9 segment-masked rows of 224
  (experiments/packed_attention_benchmark.py).
  """
  heads_major = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  out_bnsk = _attention_heads_major(heads_major(q_bsnk), heads_major(k_blnk), heads_major(v_blnk), mask_bnsl)
  return heads_major(out_bnsk)


@jax.custom_vjp
def _attention_heads_major(q_bnsk, k_bnlk, v_bnlk, mask_bnsl):
  return _attention_fwd(q_bnsk, k_bnlk, v_bnlk, mask_bnsl)[0]


def _attention_fwd(q, k, v, mask):
  logits = jnp.einsum('bnsk,bnlk->bnsl', q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)  # finite: a query with no key gets uniform weights, not NaN
  p = jax.nn.softmax(logits, axis=-1)  # float32
  out = jnp.einsum('bnsl,bnlk->bnsk', p.astype(v.dtype), v)
  return out, (q, k, v, mask, p, out)


def _attention_bwd(res, d_out):
  """The standard backward pass: dv = p^T do, ds = p (do v^T - rowsum(do o)), dq = ds k, dk = ds^T q,
  with ds 0 where the mask is False (as differentiating through the masking would give: a query that
  sees no key has uniform p, but its scores get no gradient)."""
  q, k, v, mask, p, out = res
  dv = jnp.einsum('bnsl,bnsk->bnlk', p.astype(d_out.dtype), d_out)
  dp = jnp.einsum('bnsk,bnlk->bnsl', d_out, v, preferred_element_type=jnp.float32)
  row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = p * (dp - row) / math.sqrt(q.shape[-1])
  if mask is not None:
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(q.dtype)
  dq = jnp.einsum('bnsl,bnlk->bnsk', ds, k)
  dk = jnp.einsum('bnsl,bnsk->bnlk', ds, q)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_heads_major.defvjp(_attention_fwd, _attention_bwd)


def attend(q_bsnk, k_blnk, v_blnk, mask_bl=None, implementation=None):
  """Attention with a key padding mask (mask_bl: [b, l], True = real key): `xla_attention`, or
  `jax.nn.dot_product_attention`'s cuDNN kernel for implementation='cudnn'.

  cuDNN takes no [b, 1, 1, l] mask (its bias must span the queries), so there the mask becomes
  per-sample key lengths: exact for the masks used here, real tokens first, then padding
  (tokenizers pad at the end, and every caption has at least one token, BOS or EOS; with no real key
  XLA would average all values and cuDNN return zeros). Packed rows use `segment_attention`.
  `tests/test_layers.py` checks lengths == mask.
  """
  if implementation == 'splash':
    b, s, l = q_bsnk.shape[0], q_bsnk.shape[1], k_blnk.shape[1]
    kv_segment_bl = jnp.ones((b, l), jnp.int32) if mask_bl is None else mask_bl.astype(jnp.int32)
    return on_shards(splash_attention, q_bsnk, k_blnk, v_blnk, jnp.ones((b, s), jnp.int32), kv_segment_bl)
  if implementation == 'cudnn':
    lengths = None if mask_bl is None else mask_bl.sum(-1, dtype=jnp.int32)
    return jax.nn.dot_product_attention(q_bsnk, k_blnk, v_blnk, implementation=implementation,
                                        key_value_seq_lengths=lengths)
  return xla_attention(q_bsnk, k_blnk, v_blnk, None if mask_bl is None else mask_bl[:, None, None, :])


def segment_spans(segment_bs, max_segments: int):
  """Packed rows' segments as spans, the form cuDNN's packed layout takes instead of a mask: segment
  j + 1 of a row is its tokens offsets[:, j] .. offsets[:, j] + lengths[:, j] - 1. Segments must be
  contiguous runs of their ids 1..max_segments (as `packing.pack` lays them out), padding (0)
  anywhere. -> (lengths [b, M], offsets [b, M + 1]) int32, -1 for a segment the row lacks (and in
  the offsets' last column)."""
  b = segment_bs.shape[0]
  ids = jnp.arange(1, max_segments + 1, dtype=segment_bs.dtype)
  in_bms = segment_bs[:, None, :] == ids[None, :, None]
  lengths = in_bms.sum(-1, dtype=jnp.int32)
  starts = jnp.argmax(in_bms, axis=-1).astype(jnp.int32)  # the first token of each (0 if none)
  present = lengths > 0
  return (jnp.where(present, lengths, -1),
          jnp.concatenate([jnp.where(present, starts, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1))


def paired_spans(q_segment_bs, kv_segment_bl, max_segments: int):
  """The query and key spans of packed rows (`segment_spans`) that cuDNN's packed layout pairs: it
  matches the i-th present query segment with the i-th present key segment, so a segment is kept
  where it has both queries and keys, else dropped (-1) from both. -> per side (lengths [b, M],
  offsets [b, M + 1], in_span bool [b, tokens]: the tokens inside a kept span)."""
  q_len, q_off = segment_spans(q_segment_bs, max_segments)
  kv_len, kv_off = segment_spans(kv_segment_bl, max_segments)
  kept_bm = (q_len > 0) & (kv_len > 0)
  in_span = lambda seg: (seg > 0) & jnp.take_along_axis(  # noqa: E731
      kept_bm, jnp.clip(seg - 1, 0, max_segments - 1), axis=1)
  keep = lambda length, offsets: (jnp.where(kept_bm, length, -1),  # noqa: E731
                                  offsets.at[:, :-1].set(jnp.where(kept_bm, offsets[:, :-1], -1)))
  return (*keep(q_len, q_off), in_span(q_segment_bs)), (*keep(kv_len, kv_off), in_span(kv_segment_bl))


CUDNN_PACKED_MIN_VERSION = 90600  # cuDNN's packed (ragged) layout: 9.6 or later


def cudnn_segment_attention(q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl, max_segments: int):
  """Attention inside the segments of packed rows through cuDNN's fused kernel in its packed layout:
  query segment j sees key segment j, each given as a span (`segment_spans`), so no mask or bias
  exists at all. Self-attention (the same ids) or cross-attention to caption slots (kv ids j + 1 in
  slot j). A segment without keys (or without queries) is left out. The kernel skips tokens outside
  every span, so padding queries and keys are zeroed going in and coming out: whatever it leaves
  there reaches neither the output nor a gradient. bfloat16 / float16 on an NVIDIA GPU with cuDNN >=
  9.6 (`cudnn_packed_layout`)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  (q_len, q_off, q_real), (kv_len, kv_off, kv_real) = paired_spans(q_segment_bs, kv_segment_bl, max_segments)
  q_real, kv_real = q_real[..., None, None], kv_real[..., None, None]
  zero = lambda x, real: jnp.where(real, x, jnp.zeros((), x.dtype))  # noqa: E731
  out = cudnn.dot_product_attention(
      zero(q_bsnk, q_real), zero(k_blnk, kv_real), zero(v_blnk, kv_real), q_seqlen=q_len, kv_seqlen=kv_len,
      q_offsets=q_off, kv_offsets=kv_off, scale=1 / math.sqrt(q_bsnk.shape[-1]),
      mask_type=cudnn.MaskType.NO_MASK, qkv_layout='BTNH')
  return zero(out, q_real)


def _packed_check_rows() -> tuple:
  """Two small packed rows (segment ids [2, 128], three and one segments with padding between and
  after) and their caption slots (ids [2, 3 x 16], real tokens first), for `cudnn_packed_layout`."""
  seg = jnp.array([[1] * 40 + [0] * 8 + [2] * 64 + [3] * 16, [1] * 100 + [0] * 28], jnp.int32)
  slot = jnp.arange(3)[:, None] + 1
  caption = jnp.array([[9, 16, 5], [12, 0, 0]])  # real tokens a slot
  context = jnp.where(jnp.arange(16)[None, None, :] < caption[:, :, None], slot[None], 0).reshape(2, 48)
  return seg, context.astype(jnp.int32)


@functools.cache
def cudnn_packed_layout() -> bool:
  """Whether `cudnn_segment_attention` runs here (cuDNN >= 9.6) and agrees with XLA on small packed
  rows, output and gradients, self- and cross-attention: checked once per process and said in the
  log. Where it does not, packed rows go through cuDNN with a segment mask (`segment_attention`)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    version = cudnn.check_cudnn_version()
  except Exception as e:  # noqa: BLE001 -- no GPU, no cuDNN: the mask path (which then fails loudly)
    logging.info('cuDNN packed layout: not available (%s: %s)', type(e).__name__, e)
    return False
  if version < CUDNN_PACKED_MIN_VERSION:
    logging.warning('cuDNN %d predates its packed layout (9.6): packed rows attend through a segment mask',
                    version)
    return False
  seg, context = _packed_check_rows()
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (2, 128, 2, 64), jnp.bfloat16)
  k_self, v_self = (jax.random.normal(key, (2, 128, 2, 64), jnp.bfloat16) for key in keys[1:3])
  k_text, v_text = (jax.random.normal(key, (2, 48, 2, 64), jnp.bfloat16) for key in keys[3:])

  def real_loss(attend, kv_seg):  # on the real queries only: padding is garbage in the XLA path
    return lambda q, k, v: jnp.sum(jnp.where((seg > 0)[..., None, None], attend(q, k, v, seg, kv_seg), 0
                                             ).astype(jnp.float32) ** 2)
  error = 0.0
  try:
    for k, v, kv_seg in ((k_self, v_self, seg), (k_text, v_text, context)):
      fast = jax.jit(jax.value_and_grad(real_loss(functools.partial(cudnn_segment_attention, max_segments=3),
                                                  kv_seg), argnums=(0, 1, 2)))(q, k, v)
      exact = jax.jit(jax.value_and_grad(real_loss(segment_attention, kv_seg), argnums=(0, 1, 2)))(
          *(x.astype(jnp.float32) for x in (q, k, v)))
      error = max(error, abs(float(fast[0]) - float(exact[0])) / float(exact[0]),
                  *(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
                    for a, b in zip(fast[1], exact[1])))
  except Exception as e:  # noqa: BLE001 -- a kernel this cuDNN or GPU refuses: the mask path
    logging.warning('cuDNN packed layout failed its check (%s: %s): packed rows attend through a segment mask',
                    type(e).__name__, e)
    return False
  ok = error < 0.05  # bfloat16 against float32; a misread layout is off by O(1)
  (logging.info if ok else logging.warning)(
      'cuDNN %d packed layout: %s (largest relative difference from XLA %.4f on its check)', version,
      'on' if ok else 'off, packed rows attend through a segment mask', error)
  return ok


def uses_cudnn_packed_layout(implementation, layout) -> bool:
  """Whether packed rows laid out as `layout` says (its `slots`: the most segments a row holds) attend
  through `cudnn_segment_attention`: with implementation='cudnn', where this machine's cuDNN has the
  packed layout and passes its check (`cudnn_packed_layout`); otherwise a segment mask (self-attention)
  and `slotted_cross_attention` (captions), as before."""
  return (implementation == 'cudnn' and layout is not None and layout.slots > 1
          and cudnn_packed_layout())


def segment_attention(q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl, *, block: int = 512,
                      implementation=None):
  """Attention inside the segments of packed rows (several samples' tokens in one row).

  Query i sees key j where their segment ids are equal and not 0 (0 marks padding; a padding query
  sees nothing and returns garbage that the loss must skip). The scores are made `block` queries at
  a time (a scan over query blocks): no [s, l] mask or [heads, s, l] scores exist at once, only
  [heads, block, l]. `xla_attention` inside, or cuDNN's fused attention (implementation='cudnn', the
  mask as its bias: [block, l] a row, fine for rows as long as a clip); equal to attending to each
  segment alone. (Packed rows laid out as a `PackedLayout` says go through cuDNN's packed layout
  instead, where it runs: `uses_cudnn_packed_layout`.)
  """
  if implementation == 'splash':  # a flash kernel: no [s, l] scores, no query blocks needed
    return on_shards(splash_attention, q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl)
  b, s, n, k = q_bsnk.shape
  pad = -s % block if s > block else 0
  blocks = (s + pad) // min(block, s)

  def one(qs):  # q [b, blk, n, k], segments [b, blk]
    q, seg = qs
    mask = (seg[:, :, None] == kv_segment_bl[:, None, :]) & (seg[:, :, None] > 0)  # [b, blk, l]
    if implementation == 'cudnn':
      return jax.nn.dot_product_attention(q, k_blnk, v_blnk, mask=mask[:, None], implementation='cudnn')
    return xla_attention(q, k_blnk, v_blnk, mask[:, None])

  if blocks == 1:
    return one((q_bsnk, q_segment_bs))
  q = jnp.pad(q_bsnk, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, blocks, block, n, k).swapaxes(0, 1)
  seg = jnp.pad(q_segment_bs, ((0, 0), (0, pad))).reshape(b, blocks, block).swapaxes(0, 1)
  # Checkpointed: the backward pass recomputes each block's scores instead of keeping all of them.
  out = jax.lax.map(jax.checkpoint(one), (q, seg))  # [blocks, b, block, n, k]
  return out.swapaxes(0, 1).reshape(b, s + pad, n, k)[:, :s]


SPLASH_TILE = 128  # the splash kernel's smallest query and key tile


def splash_attention(q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl):
  """Attention through the Pallas TPU flash kernel (`splash_attention`), on one device's arrays
  (`on_shards` splits sharded ones): query i sees key j where their segment ids (int32) are equal,
  so padding masks and packed rows are both segment ids, and no [s, l] mask or scores exist.

  Sequences are padded to the kernel's tiles (multiples of 128); padded keys get segment -1 and
  padded queries (cut off again) the first key's. Off TPU (the abstract mesh's devices, so an
  ahead-of-time compile for a TPU slice gets the real kernel) it runs in Pallas' interpret mode:
  the same arithmetic, slowly, for tests. Scores and softmax in float32, as `xla_attention`.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
  b, s, n, k = q_bsnk.shape
  l = k_blnk.shape[1]
  s_pad, l_pad = -s % SPLASH_TILE, -l % SPLASH_TILE
  heads_major = lambda x, pad: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
  q = heads_major(q_bsnk * (1 / math.sqrt(k)), s_pad)
  k_, v = heads_major(k_blnk, l_pad), heads_major(v_blnk, l_pad)
  q_seg = jnp.pad(q_segment_bs.astype(jnp.int32), ((0, 0), (0, s_pad)))
  if s_pad:
    q_seg = q_seg.at[:, s:].set(kv_segment_bl[:, :1].astype(jnp.int32))
  kv_seg = jnp.pad(kv_segment_bl.astype(jnp.int32), ((0, 0), (0, l_pad)), constant_values=-1)
  tile = lambda length: max(t for t in (512, 256, SPLASH_TILE) if length % t == 0)  # noqa: E731
  bq, bkv = tile(s + s_pad), tile(l + l_pad)
  kernel = splash.make_splash_mha(
      splash_mask.MultiHeadMask([splash_mask.FullMask((s + s_pad, l + l_pad))] * n),
      head_shards=1, q_seq_shards=1, interpret=_platform() != 'tpu',
      block_sizes=splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                                    block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv))
  one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))  # noqa: E731
  out_bnsk = jax.vmap(one)(q, k_, v, q_seg, kv_seg)
  return out_bnsk.transpose(0, 2, 1, 3)[:, :s].astype(v_blnk.dtype)


def _platform() -> str:
  """The platform the code is compiled for: the current mesh's devices' (which may be a TPU slice
  compiled for ahead of time on a CPU host), else the default backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return jax.default_backend() if device is None else device.platform


def on_shards(fn, q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl):
  """`fn` (an attention kernel XLA cannot partition, such as a Pallas call) on each device's share:
  batch and heads split as the activations are, queries also by sequence when their tokens are
  sharded (keys and values whole). Inside a shard_map already: `fn` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return fn(q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl)
  batch_axes, seq_axes, head_axes, _ = _mesh_axes(('act_batch', 'act_seq', 'act_heads', None), q_bsnk.shape)
  b, h = batch_axes or None, head_axes or None
  q_spec, kv_spec = P(b, seq_axes or None, h, None), P(b, None, h, None)
  # check_vma off: a Pallas call's outputs do not say how they vary over the mesh.
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(b, seq_axes or None), P(b, None)),
                       out_specs=q_spec, check_vma=False)(q_bsnk, k_blnk, v_blnk, q_segment_bs, kv_segment_bl)


class PackedLayout(NamedTuple):
  """How packed rows are laid out, so attention can skip other samples' tokens: every sample starts
  at a multiple of `block` tokens (`packing.pack(align=block)`) and has at most `window` tokens;
  the context (captions) is `slots` equal slots, slot i the caption of segment i + 1."""
  block: int
  window: int
  slots: int = 0


def windowed_segment_attention(q_bsnk, k_bsnk, v_bsnk, segment_bs, layout: PackedLayout, *, chunk: int = 512):
  """Self-attention inside the segments of packed rows laid out as `layout` says (queries and keys
  are the same tokens). A block of `layout.block` queries holds one sample's tokens (and padding),
  so it attends to the `layout.window` keys from that sample's first token on: [s / block, block,
  window] scores instead of `segment_attention`'s [s, s], and the same result. The windows are
  gathered copies of the keys and values: they are made about `chunk` queries at a time (a
  checkpointed map, like `segment_attention`'s), so at most [chunk / block, window] exist at once.
  """
  b, s, n, k = q_bsnk.shape
  block, window = layout.block, min(layout.window, s)
  blocks = s // block
  first_bs = jnp.concatenate([jnp.ones((b, 1), bool), segment_bs[:, 1:] != segment_bs[:, :-1]], axis=1)
  start_bs = jax.lax.cummax(jnp.where(first_bs, jnp.arange(s), 0), axis=1)  # each token's run start
  take = lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, window, axis=0)  # clamped to fit: still covers it
  window_of = jax.vmap(jax.vmap(take, (None, 0)), (0, 0))  # [b, s, ...], [b, c] -> [b, c, window, ...]

  def one(chunk_args):  # c blocks: q [b, c, block, n, k], their run starts [b, c], segments [b, c, block]
    q, start_bc, seg_q = chunk_args
    c = start_bc.shape[1]
    k_w, v_w, seg_w = window_of(k_bsnk, start_bc), window_of(v_bsnk, start_bc), window_of(segment_bs, start_bc)
    mask = (seg_q[..., :, None] == seg_w[..., None, :]) & (seg_q[..., :, None] > 0)  # [b, c, block, window]
    out = xla_attention(q.reshape(b * c, block, n, k), k_w.reshape(b * c, window, n, k),
                        v_w.reshape(b * c, window, n, k), mask.reshape(b * c, 1, block, window))
    return out.reshape(b, c, block, n, k)

  per = max(d for d in range(1, blocks + 1) if blocks % d == 0 and d * block <= max(chunk, block))
  args = (q_bsnk.reshape(b, blocks, block, n, k), start_bs[:, ::block], segment_bs.reshape(b, blocks, block))
  if per == blocks:
    return one(args).reshape(b, s, n, k)
  by_chunk = lambda x: x.reshape(b, blocks // per, per, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
  out = jax.lax.map(jax.checkpoint(one), tuple(map(by_chunk, args)))  # [chunks, b, per, block, n, k]
  return out.swapaxes(0, 1).reshape(b, s, n, k)


def slotted_cross_attention(q_bsnk, k_blnk, v_blnk, segment_bs, context_segment_bl, layout: PackedLayout):
  """Cross-attention of packed rows to their samples' captions. Rows are block-aligned (`layout`:
  a block of `layout.block` queries holds one sample's tokens, and padding), so each block takes
  its own sample's caption slot, chosen by a one-hot matmul (no gathers, nor their scatter-adds in
  the backward pass), and attends to its l / slots keys: [s / block, block, l / slots] scores, one
  caption's worth, not one per slot. context_segment_bl [b, l]: slot j's tokens are j + 1 where
  real, 0 where padding. Equal to `segment_attention(q, k, v, segment_bs, context_segment_bl)` on
  real queries; padding queries get 0.
  """
  slots, block = layout.slots, layout.block
  b, s, n, d = q_bsnk.shape
  l = context_segment_bl.shape[1]
  per_slot, blocks = l // slots, s // block
  # A block's sample is its first token's (samples start at block multiples); padding blocks: no slot.
  onehot_bgj = jax.nn.one_hot(segment_bs[:, ::block] - 1, slots, dtype=k_blnk.dtype)
  # The captions' keys and values are picked heads-major ([b, slots, n, l / slots, d], a transpose of
  # the small caption tensors), so the picks come out in the attention's layout: picking them
  # tokens-major and transposing each block's copy took ~2% of the native config's step here.
  pick = lambda x_bjnld: jnp.einsum('bgj,bjnld->bgnld', onehot_bgj, x_bjnld).reshape(  # noqa: E731
      b * blocks, *x_bjnld.shape[2:])
  heads_major = lambda x: x.reshape(b, slots, per_slot, n, d).transpose(0, 1, 3, 2, 4)  # noqa: E731
  real_bjl = (context_segment_bl > 0).astype(k_blnk.dtype).reshape(b, slots, per_slot)
  real = jnp.einsum('bgj,bjl->bgl', onehot_bgj, real_bjl).reshape(b * blocks, 1, 1, per_slot) > 0.5
  q = q_bsnk.reshape(b * blocks, block, n, d).transpose(0, 2, 1, 3)
  out = _attention_heads_major(q, pick(heads_major(k_blnk)), pick(heads_major(v_blnk)), real)
  out = out.transpose(0, 2, 1, 3).reshape(b, s, n, d)
  return jnp.where((segment_bs > 0)[:, :, None, None], out, 0)


def self_attention(q_bsnk, k_bsnk, v_bsnk, mask_bs=None, *, implementation=None,
                   sequence_parallel: str = 'all_to_all', segment_bs=None, layout: PackedLayout | None = None):
  """Self-attention over spacetime tokens that may be sharded on the mesh's 'sequence' axis.

  With the tokens ('act_seq') sharded over n devices, each device holds s/n queries, keys and values:
  - 'all_to_all' (DeepSpeed-Ulysses): one all-to-all turns [s/n tokens, all heads] into [all
    tokens, heads/n], attention runs locally over whole sequences, one all-to-all turns it back.
    Moves 4 activations of s/n tokens per device per layer, whatever n; needs heads (per tensor
    shard) divisible by n, otherwise it falls back to 'gather_kv'.
  - 'gather_kv': queries stay put, keys and values are all-gathered (n-1 times more traffic).
  - 'xla': no explicit collectives; the compiler chooses (it gathers keys and values).
  All three equal unsharded attention, with any `implementation` (see `Attention`; 'splash' always
  runs inside a shard_map). mask_bs: [b, s] True where a key is real (padding).
  segment_bs: [b, s] segment ids of packed rows (0: padding) instead of a mask: `segment_attention`,
  or with a `layout` and rows longer than twice its window, `windowed_segment_attention` (where the
  queries are whole rows), or with 'cudnn' and a `layout`, cuDNN's packed layout (spans, no mask;
  `uses_cudnn_packed_layout`).
  """
  if segment_bs is not None and mask_bs is not None:
    raise ValueError('give a key mask or segment ids, not both (segment 0 is padding)')

  def plain(q, k, v, m, q_seg=None, unsharded=True):  # m: the mask, or the keys' segment ids
    if segment_bs is None:
      return attend(q, k, v, m, implementation)
    # cuDNN's packed layout takes whole rows of queries (their spans and the keys' must match) on each device.
    if q_seg is None and unsharded and uses_cudnn_packed_layout(implementation, layout):
      return cudnn_segment_attention(q, k, v, m, m, layout.slots)
    # Windows only pay when they skip most of a row: their gathers cost more than the scores they skip.
    if (implementation != 'splash' and layout is not None and q_seg is None and q.shape[1] % layout.block == 0
        and q.shape[1] > 2 * layout.window):
      return windowed_segment_attention(q, k, v, m, layout)
    return segment_attention(q, k, v, m if q_seg is None else q_seg, m, implementation=implementation)

  extra = mask_bs if segment_bs is None else segment_bs
  batch_axes, seq_axes, head_axes, _ = _mesh_axes(('act_batch', 'act_seq', 'act_heads', None), q_bsnk.shape)
  if sequence_parallel == 'xla' or not seq_axes:
    return plain(q_bsnk, k_bsnk, v_bsnk, extra, unsharded=not seq_axes)
  mesh = jax.sharding.get_abstract_mesh()
  n_seq = math.prod(mesh.shape[a] for a in seq_axes)
  local_heads = q_bsnk.shape[2] // math.prod(mesh.shape[a] for a in head_axes)
  use_all_to_all = sequence_parallel == 'all_to_all' and local_heads % n_seq == 0
  spec = P(batch_axes or None, seq_axes, head_axes or None, None)
  extra_spec = P(batch_axes or None, seq_axes)

  def local(q, k, v, m):  # [b/dp, s/n, heads/tp, k]; m: [b/dp, s/n] or None
    q_seg = m if segment_bs is not None else None  # the local queries' segments
    if m is not None:
      m = jax.lax.all_gather(m, seq_axes, axis=1, tiled=True)  # every query sees every key's mask
    if use_all_to_all:  # the queries become whole sequences: so do their segments
      to_heads = lambda x: jax.lax.all_to_all(x, seq_axes, split_axis=2, concat_axis=1, tiled=True)
      out = plain(to_heads(q), to_heads(k), to_heads(v), m)  # [b, s, heads/(tp n), k]
      return jax.lax.all_to_all(out, seq_axes, split_axis=1, concat_axis=2, tiled=True)
    gather = lambda x: jax.lax.all_gather(x, seq_axes, axis=1, tiled=True)
    return plain(q, gather(k), gather(v), m, q_seg)

  check_vma = implementation != 'splash'  # a Pallas call's outputs do not say how they vary over the mesh
  if extra is None:
    return jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(spec, spec, spec),
                         out_specs=spec, check_vma=check_vma)(q_bsnk, k_bsnk, v_bsnk)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, extra_spec), out_specs=spec,
                       check_vma=check_vma)(q_bsnk, k_bsnk, v_bsnk, extra)


class Attention(nnx.Module):
  """Multi-head attention with QK-norm; self-attention with RoPE, or cross-attention to `context`.

  `zero_out=True` zero-initialises the output projection so the residual branch starts at 0.
  `qkv_bias=True` adds biases to the query, key and value projections (as in the DiT paper's blocks).
  `implementation`: None/'xla' (`xla_attention`), 'cudnn' (`jax.nn.dot_product_attention`'s cuDNN
  kernel) or 'splash' (`splash_attention`, the Pallas TPU kernel; packed rows as segment ids).
  `query_axis` names the logical axis of the queries: 'act_seq' (spacetime tokens, sharded for
  sequence parallelism), 'act_text' (text tokens) or None (a few pooling queries).
  `sequence_parallel` chooses how self-attention over sharded spacetime tokens communicates (see
  `self_attention`); cross-attention needs nothing: the text is whole on every device.
  `rope_theta`, `rope_position_scale`: RoPE's base and the scale of positions (`apply_rope`).
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, context_dim: int | None = None,
               qk_norm: bool = True, qkv_bias: bool = False, zero_out: bool = False, dtype=jnp.float32,
               implementation: str | None = None, query_axis: str | None = 'act_seq',
               sequence_parallel: str = 'all_to_all', rope_theta: float = 10000.0,
               rope_position_scale: float = 1.0):
    if dim % num_heads:
      raise ValueError(f'width {dim} is not divisible by {num_heads} heads')
    k = dim // num_heads
    context_dim = context_dim or dim
    self.wq = param(rngs, init_xavier, (dim, num_heads, k), ('embed', 'heads', 'kv'))
    self.wk = param(rngs, init_xavier, (context_dim, num_heads, k), ('embed', 'heads', 'kv'))
    self.wv = param(rngs, init_xavier, (context_dim, num_heads, k), ('embed', 'heads', 'kv'))
    self.wo = param(rngs, init_zeros if zero_out else init_xavier, (num_heads, k, dim),
                    ('heads', 'kv', 'embed'))
    self.bo = param(rngs, init_zeros, (dim,), ('embed',))
    if qkv_bias:  # only then: the parameter trees of models without them stay as they were
      self.bq, self.bk, self.bv = (param(rngs, init_zeros, (num_heads, k), ('heads', 'kv')) for _ in range(3))
    self.qkv_bias = qkv_bias
    self.q_norm = RMSNorm(k, rngs=rngs) if qk_norm else None
    self.k_norm = RMSNorm(k, rngs=rngs) if qk_norm else None
    self.dtype = dtype
    self.implementation = None if implementation in (None, 'xla') else implementation
    self.query_axis = query_axis
    self.sequence_parallel = sequence_parallel
    self.rope_theta = rope_theta
    self.rope_position_scale = rope_position_scale
    self.sow_weights = False  # True: also store the attention probabilities [b, heads, s, l] as an
    # nnx.Intermediate 'attention_weights' (analysis only: it materialises them; see eval/analysis.py)

  def __call__(self, x_bsd, *, context_bld=None, mask_bl=None, pos_bsa=None, segment_bs=None,
               context_segment_bl=None, layout: PackedLayout | None = None):
    """mask_bl: [b, l] True where a key is real; pos_bsa: positions for RoPE (self-attention).

    Packed rows: segment_bs [b, s] the queries' segment ids (0: padding); a query sees the keys of
    its own segment only: the tokens' own (self-attention), or `context_segment_bl` [b, l] of the
    context's tokens (cross-attention; 0 for padding tokens, then no `mask_bl`). `layout`: how the
    rows are laid out, for attention that skips other samples (`PackedLayout`).
    """
    dt = self.dtype
    kv_in = x_bsd if context_bld is None else context_bld
    q = jnp.einsum('bsd,dnk->bsnk', x_bsd.astype(dt), self.wq.astype(dt))
    k = jnp.einsum('bld,dnk->blnk', kv_in.astype(dt), self.wk.astype(dt))
    v = jnp.einsum('bld,dnk->blnk', kv_in.astype(dt), self.wv.astype(dt))
    if self.qkv_bias:
      q, k, v = q + self.bq.astype(dt), k + self.bk.astype(dt), v + self.bv.astype(dt)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if pos_bsa is not None:
      theta, scale = self.rope_theta, self.rope_position_scale
      q, k = apply_rope(q, pos_bsa, theta, scale), apply_rope(k, pos_bsa, theta, scale)
    q = constrain(q, ('act_batch', self.query_axis, 'act_heads', None))
    if self.sow_weights:
      logits = jnp.einsum('bsnk,blnk->bnsl', q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
      if mask_bl is not None:
        logits = jnp.where(mask_bl[:, None, None, :], logits, -jnp.inf)
      self.sow(nnx.Intermediate, 'attention_weights', jax.nn.softmax(logits, axis=-1))
    if context_bld is None and self.query_axis == 'act_seq':
      out = self_attention(q, k, v, mask_bl, implementation=self.implementation,
                           sequence_parallel=self.sequence_parallel, segment_bs=segment_bs, layout=layout)
    elif segment_bs is not None:
      if context_segment_bl is None or mask_bl is not None:
        raise ValueError('packed cross-attention takes context_segment_bl (0 for padding) and no mask_bl')
      # (Queries sharded over the sequence keep the slotted path: the kernel's spans are whole rows'.)
      if uses_cudnn_packed_layout(self.implementation, layout) and not _mesh_axes(('act_seq',), q.shape[1:2])[0]:
        out = cudnn_segment_attention(q, k, v, segment_bs, context_segment_bl, layout.slots)
      elif self.implementation != 'splash' and layout is not None and layout.slots and q.shape[1] % layout.block == 0:
        out = slotted_cross_attention(q, k, v, segment_bs, context_segment_bl, layout)
      else:
        out = segment_attention(q, k, v, segment_bs, context_segment_bl, implementation=self.implementation)
    else:
      out = attend(q, k, v, mask_bl, self.implementation)
    return jnp.einsum('bsnk,nkd->bsd', out, self.wo.astype(dt)) + self.bo.astype(dt)


class Mlp(nnx.Module):
  """Two dense layers with GELU; `token_axis` as `Attention.query_axis`."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               token_axis: str | None = 'act_seq'):
    self.fc1 = Dense(dim, hidden, ('embed', 'mlp'), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(hidden, dim, ('mlp', 'embed'), rngs=rngs, dtype=dtype)
    self.token_axis = token_axis

  def __call__(self, x_bsd):
    h = jax.nn.gelu(self.fc1(x_bsd), approximate=True)
    h = constrain(h, ('act_batch', self.token_axis, 'act_mlp'))
    return self.fc2(h)
