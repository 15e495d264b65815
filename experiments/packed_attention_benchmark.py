r"""Self-attention of packed rows against fixed-size clips: one layer, forward and forward + backward.

  python experiments/packed_attention_benchmark.py [--heads=4 --head_dim=64 --reps=10]

Two rows of 1024 tokens packed with clips of the native shapes mix (2 x 8 x 8 patches: 16 to 224
tokens, each at a multiple of the block), through `layers.windowed_segment_attention` at query
blocks of 16 and 32 (window 224, the largest clip) and through a dense segment-masked attention
inside bins of 128-512 tokens (a layout not built: timing only, these rows are not planned into
bins); against 16 clips of 128 tokens with plain `jax.nn.dot_product_attention`. Prints one JSON
line per variant (milliseconds). It times attention only: the rest of a packed step costs what a
fixed-size step costs.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sora_jax.models import layers

flags.DEFINE_integer('heads', 4, 'Attention heads.')
flags.DEFINE_integer('head_dim', 64, 'Channels per head.')
flags.DEFINE_integer('reps', 10, 'Timed calls per variant (after one warm-up call).')
FLAGS = flags.FLAGS
ROWS, LENGTH, WINDOW = 2, 1024, 224
CLIP_TOKENS = (16, 64, 112, 112, 128, 224, 224)  # 1x32x32 (still) ... 16x56x32 at 2 x 8 x 8


def packed_segments(rng, align: int) -> np.ndarray:
  """int32 [ROWS, LENGTH]: clips of random sizes one after another (each at a multiple of `align`)."""
  out = np.zeros((ROWS, LENGTH), np.int32)
  for row in out:
    start, segment = 0, 1
    while True:
      n = CLIP_TOKENS[rng.integers(len(CLIP_TOKENS))]
      if start + n > LENGTH:
        break
      row[start:start + n] = segment
      start, segment = -(-(start + n) // align) * align, segment + 1
  return out


def timed_ms(fn, *args) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(FLAGS.reps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / FLAGS.reps * 1e3


def report(name: str, attend, *args) -> None:
  """attend(q, k, v, *rest): the segment ids are an input, as in a train step (not folded constants)."""
  grad = jax.grad(lambda *a: jnp.sum(attend(*a) ** 2), argnums=(0, 1, 2))
  print(json.dumps(dict(variant=name, forward_ms=round(timed_ms(attend, *args), 2),
                        forward_backward_ms=round(timed_ms(grad, *args), 2))), flush=True)


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(ROWS, LENGTH, FLAGS.heads, FLAGS.head_dim)), jnp.float32)
             for _ in range(3))
  for block in (16, 32):
    layout = layers.PackedLayout(block, WINDOW)
    report(f'windowed block {block}', lambda q, k, v, s, layout=layout: layers.windowed_segment_attention(q, k, v, s, layout),
           q, k, v, jnp.asarray(packed_segments(rng, block)))
  segment_bs = jnp.asarray(packed_segments(rng, 16))
  for bin_ in (128, 256, 512):  # clips must fit a bin: the 224-token ones need 256
    def in_bins(q, k, v, segment_bs, bin_=bin_):
      split = lambda x: x.reshape(ROWS * LENGTH // bin_, bin_, *x.shape[2:])  # noqa: E731
      seg = split(segment_bs)
      mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
      return jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask[:, None]).reshape(q.shape)
    report(f'dense in bins of {bin_}', in_bins, q, k, v, segment_bs)
  clips = lambda x: x.reshape(ROWS * LENGTH // 128, 128, *x.shape[2:])  # noqa: E731
  report('fixed: 16 clips of 128', jax.nn.dot_product_attention, clips(q), clips(k), clips(v))


if __name__ == '__main__':
  app.run(main)
