r"""Attention of packed rows against fixed-size clips: one layer, forward and forward + backward.

  python experiments/packed_attention_benchmark.py [--heads=6 --head_dim=32 --reps=20]
  python experiments/packed_attention_benchmark.py --implementation=cudnn --dtype=bfloat16   # on a GPU

About 2048 tokens of clips of the native shapes mix (2 x 8 x 8 patches: 16 to 224 tokens), packed
as training packs them (`packing.plan_rows`, each clip at a multiple of 16 tokens):
- rows of 224 tokens (as long as the largest clip; `configs/shapes_native.py`): a dense
  segment-masked attention over each row (`layers.segment_attention`);
- rows of 1024 tokens: `layers.windowed_segment_attention`, 16 queries against the 224 keys from
  their clip's first token;
against 16 clips of 128 tokens (`layers.attend`, as fixed-size training runs it) and, for
reference, `jax.nn.dot_product_attention`'s own backward pass. Prints one JSON line per variant
(milliseconds, best of 3 rounds of `reps` calls) and the rows' share of real tokens. With
--implementation=cudnn the dense rows and the fixed clips go through cuDNN's fused attention (the rows
with a segment mask, and again with cuDNN's packed layout: spans, no mask; `layers.cudnn_segment_attention`), and
each line also gives the largest difference from the XLA path on the real tokens (output, gradients). It times
attention only: the rest of a packed step costs what a fixed-size step of as many tokens costs.

Then cross-attention to captions of 32 tokens (20 real): packed rows with one caption slot per clip
(`layers.slotted_cross_attention`; rows of 224 with 3 slots as the native config, rows of 1024 with
16), against 16 clips of 128 tokens with one caption each (`layers.attend`, XLA).
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sora_jax.data import packing
from sora_jax.models import layers

flags.DEFINE_integer('heads', 6, 'Attention heads (configs/shapes.py: 6).')
flags.DEFINE_integer('head_dim', 32, 'Channels per head (configs/shapes.py: 32).')
flags.DEFINE_integer('reps', 20, 'Timed calls per round (after one warm-up call).')
flags.DEFINE_enum('implementation', 'xla', ['xla', 'cudnn'], 'Attention kernel (cudnn: on an NVIDIA GPU).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'q, k and v dtype (cudnn: bfloat16).')
FLAGS = flags.FLAGS
TOKENS, BLOCK, WINDOW = 2048, 16, 224
CLIP_TOKENS = (16, 64, 112, 112, 128, 224, 224)  # 1x32x32 (still), 8x32x32, 8x32x56, ..., 16x56x32


def packed_rows(rng, length: int, max_segments: int = 64) -> np.ndarray:
  """int32 [rows, length] segment ids: the first rows of a first-fit plan over random clips."""
  counts = np.asarray(CLIP_TOKENS)[rng.integers(len(CLIP_TOKENS), size=4096)]
  plan = packing.plan_rows(counts, length, max_segments=max_segments, align=BLOCK)[:TOKENS // length]
  out = np.zeros((len(plan), length), np.int32)
  for row, clips in zip(out, plan):
    start = 0
    for segment, i in enumerate(clips, 1):
      row[start:start + counts[i]] = segment
      start = packing.aligned(start + counts[i], BLOCK)
  return out


def timed_ms(fn, *args) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(FLAGS.reps):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / FLAGS.reps * 1e3)
  return best


def report(name: str, attend, q, k, v, *rest, reference=None, **extra) -> None:
  """attend(q, k, v, *rest): the segment ids are an input, as in a train step (not folded constants).
  `reference`: the same attention through XLA, to compare outputs and gradients with."""
  grad = jax.grad(lambda *a: jnp.sum(attend(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
  if reference is not None:
    real = (rest[0] > 0)[..., None, None] if rest else True
    real_loss = lambda f: lambda *a: jnp.sum(jnp.where(real, f(*a), 0).astype(jnp.float32) ** 2)  # noqa: E731
    grad_ref, masked_grad = (jax.grad(real_loss(f), argnums=(0, 1, 2)) for f in (reference, attend))
    diff = lambda a, b: float(jnp.max(jnp.abs(jnp.where(real, a, 0).astype(jnp.float32) -  # noqa: E731
                                              jnp.where(real, b, 0).astype(jnp.float32))))
    extra['max_abs_diff_vs_xla'] = round(diff(attend(q, k, v, *rest), reference(q, k, v, *rest)), 5)
    extra['max_abs_grad_diff_vs_xla'] = round(max(
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(masked_grad(q, k, v, *rest), grad_ref(q, k, v, *rest))), 5)
  print(json.dumps(dict(variant=name, forward_ms=round(timed_ms(attend, q, k, v, *rest), 2),
                        forward_backward_ms=round(timed_ms(grad, q, k, v, *rest), 2), **extra)), flush=True)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  impl, dtype = FLAGS.implementation, jnp.dtype(FLAGS.dtype)
  qkv = lambda rows, length: [jnp.asarray(rng.normal(size=(rows, length, FLAGS.heads, FLAGS.head_dim)), dtype)
                              for _ in range(3)]  # noqa: E731
  for length in (WINDOW, 1024):
    segment_bs = packed_rows(rng, length)
    layout = layers.PackedLayout(BLOCK, WINDOW)
    attend = lambda q, k, v, s, layout=layout, impl=impl: layers.self_attention(  # noqa: E731
        q, k, v, segment_bs=s, layout=layout, implementation=impl)
    dense = length <= 2 * WINDOW
    reference = None
    if impl != 'xla' and dense:  # the windowed path is XLA's whatever the implementation
      reference = lambda q, k, v, s, layout=layout: layers.self_attention(q, k, v, segment_bs=s, layout=layout)  # noqa: E731
    report(f'packed: {len(segment_bs)} rows of {length} ({"dense" if dense else f"windowed, block {BLOCK}"}, '
           f'{impl if dense else "xla"})', attend, *qkv(*segment_bs.shape), jnp.asarray(segment_bs),
           reference=reference, real_tokens=int((segment_bs > 0).sum()),
           efficiency=round(packing.efficiency(segment_bs), 3))
    if impl == 'cudnn':  # the segments as spans (cuDNN >= 9.6): no mask, any row length
      spans = layers.PackedLayout(BLOCK, WINDOW, slots=int(segment_bs.max()))
      report(f'packed: {len(segment_bs)} rows of {length} (cuDNN packed layout, spans of {spans.slots} segments; '
             f'on: {layers.uses_cudnn_packed_layout(impl, spans)})',
             lambda q, k, v, s, spans=spans: layers.self_attention(q, k, v, segment_bs=s, layout=spans, implementation=impl),
             *qkv(*segment_bs.shape), jnp.asarray(segment_bs), real_tokens=int((segment_bs > 0).sum()),
             reference=lambda q, k, v, s: layers.segment_attention(q, k, v, s, s))
  clips = qkv(TOKENS // 128, 128)
  report(f'fixed: 16 clips of 128 (layers.attend, {impl})', lambda q, k, v: layers.attend(q, k, v, implementation=impl),
         *clips, reference=layers.attend if impl != 'xla' else None, real_tokens=TOKENS)
  report('fixed: 16 clips of 128 (jax.nn.dot_product_attention, xla)', jax.nn.dot_product_attention, *clips)

  caption, real = 32, 20  # caption tokens a slot, real ones first
  for length, slots in ((WINDOW, 3), (1024, 16)):
    segment_bs = packed_rows(rng, length, max_segments=slots)
    rows = len(segment_bs)
    context_bl = np.where(np.arange(caption) < real, np.arange(1, slots + 1)[:, None], 0).reshape(1, -1).repeat(rows, 0)
    layout = layers.PackedLayout(BLOCK, WINDOW, slots)
    q, k, v = qkv(rows, length)[0], *qkv(rows, slots * caption)[:2]
    report(f'cross-attention, packed: {rows} rows of {length}, {slots} caption slots (slotted_cross_attention)',
           lambda q, k, v, s, c, layout=layout: layers.slotted_cross_attention(q, k, v, s, c, layout),
           q, k, v, jnp.asarray(segment_bs), jnp.asarray(context_bl),
           reference=lambda q, k, v, s, c: layers.segment_attention(q, k, v, s, c))
    if impl == 'cudnn' and layers.cudnn_packed_layout():
      report(f'cross-attention, packed: {rows} rows of {length}, {slots} caption slots (cuDNN packed layout)',
             lambda q, k, v, s, c, slots=slots: layers.cudnn_segment_attention(q, k, v, s, c, slots),
             q.astype(dtype), k.astype(dtype), v.astype(dtype), jnp.asarray(segment_bs), jnp.asarray(context_bl),
             reference=lambda q, k, v, s, c: layers.segment_attention(q, k, v, s, c))
  q, k, v = clips[0], *qkv(TOKENS // 128, caption)[:2]
  report('cross-attention, fixed: 16 clips of 128, a caption each (layers.attend, xla)',
         lambda q, k, v: layers.attend(q, k, v, jnp.arange(caption)[None] < real), q, k, v)


if __name__ == '__main__':
  app.run(main)
