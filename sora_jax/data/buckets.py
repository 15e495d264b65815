"""Aspect-ratio and duration buckets: every batch holds clips of one size, so nothing is cropped or padded.

The alternative to packing (`sora_jax/data/packing.py`) for data of several sizes (`config.data.sizes`):
a clip of size (T, H, W) only ever shares a batch with clips of the same size, and each size (a
bucket) has its own batch size, chosen so that every step trains on about the same number of
tokens (`config.buckets.tokens_per_step`). The train step compiles once per bucket; a step wastes no
token on padding, but each shape is a separate compile and small buckets fill slowly.

Epoch e visits the examples in a seeded shuffled order; each bucket fills its batches in that order,
and a batch joins the stream when it is full, so buckets interleave in proportion to their size. An
epoch's last, partial batch of each bucket is left out (its clips come back, reshuffled, in later
epochs). Batch k of the stream is a pure function of (seed, k) and the batch sizes, so a run resumes
at any step with nothing to checkpoint. The batch sizes are multiples of the data-parallel size:
resuming on another one changes the later steps' batches (the log lists the sizes).

Pure numpy: it runs in the input pipeline, on the host.
"""

import collections
import math

import numpy as np

from sora_jax import UsageError
from sora_jax.data import packing


def batch_sizes(sizes, patch, tokens_per_step: int, multiple: int = 1) -> dict:
  """{(T, H, W): batch size} for each distinct clip size: the largest multiple of `multiple` (the
  data-parallel size x gradient accumulation steps, and of the process count) whose clips hold at most
  `tokens_per_step` patch tokens, and at least `multiple`."""
  out = {}
  for size in sorted(set(map(tuple, sizes))):
    per_clip = packing.tokens_of(size, patch)
    out[size] = max(multiple, tokens_per_step // per_clip // multiple * multiple)
  return out


def plan_batches(sizes, batch_size: dict) -> list[list[int]]:
  """Example indices per batch, in the given order (e.g. an epoch's shuffled order): each size
  collects its examples and a batch is emitted when `batch_size[size]` are in; partial batches are dropped."""
  batches, filling = [], {}
  for i, size in enumerate(map(tuple, sizes)):
    batch = filling.setdefault(size, [])
    batch.append(i)
    if len(batch) == batch_size[size]:
      batches.append(batch)
      filling[size] = []
  return batches


class BucketedBatches:
  """An endless random-access stream of batches over a source of examples (`pipeline.to_example`
  dicts, 'video' uint8 [T, H, W, 3] of several sizes): item k is this process's share (rows
  [p * b / P, (p + 1) * b / P)) of global batch k, stacked: 'video' uint8 [b / P, T, H, W, 3], ...

  `sizes[i]` is example i's (T, H, W); see the module docstring for the order.
  """

  def __init__(self, source, sizes, *, patch, tokens_per_step: int, multiple: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.source, self.seed = source, seed
    self.sizes = [tuple(int(n) for n in size) for size in sizes]
    self.batch_size = batch_sizes(self.sizes, patch, tokens_per_step, multiple)
    self.tokens = {size: packing.tokens_of(size, patch) * b for size, b in self.batch_size.items()}
    self.process_index, self.process_count = process_index, process_count
    if any(b % process_count for b in self.batch_size.values()):
      raise ValueError(f'bucket batch sizes {self.batch_size} do not split over {process_count} processes')
    self._plans = packing.EpochPlans(self._plan)

  def __len__(self):
    return 2**40  # endless; grain needs a length

  def _plan(self, e: int) -> list:
    order = np.random.default_rng([self.seed, e]).permutation(len(self.sizes))
    batches = plan_batches([self.sizes[i] for i in order], self.batch_size)
    if not batches:
      raise UsageError(f'config.buckets.tokens_per_step: no size has a batch\'s worth of clips ({len(self.sizes)} '
                       f'clips, batch sizes {self.batch_size})')
    return [[int(order[i]) for i in batch] for batch in batches]

  def epoch(self, e: int) -> list:
    """Epoch e's batches: lists of example indices."""
    return self._plans.epoch(e)

  def epoch_usage(self, e: int = 0) -> float:
    """The share of epoch e's examples that are in its batches (the rest wait for a later epoch)."""
    return sum(map(len, self.epoch(e))) / len(self.sizes)

  def batch_examples(self, k: int) -> list:
    """The example indices of stream batch k (all processes' shares)."""
    return self._plans[k]

  def __getitem__(self, k: int) -> dict:
    indices = self.batch_examples(int(k))
    share = len(indices) // self.process_count
    examples = [self.source[i] for i in indices[self.process_index * share:(self.process_index + 1) * share]]
    return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def describe(stream: BucketedBatches) -> str:
  """One line per bucket for the log: size, batch size, tokens per step, number of clips."""
  counts = collections.Counter(stream.sizes)
  return '; '.join(f'{t}x{h}x{w}: batch {b} ({stream.tokens[(t, h, w)]} tokens), {counts[(t, h, w)]} clips'
                   for (t, h, w), b in stream.batch_size.items())


def mean_tokens_per_step(stream: BucketedBatches, e: int = 0) -> float:
  """Epoch e's mean patch tokens per step (the target is `tokens_per_step`)."""
  batches = stream.epoch(e)
  return float(np.mean([stream.tokens[stream.sizes[b[0]]] for b in batches])) if batches else math.nan


def starved(stream: BucketedBatches) -> list[str]:
  """The sizes ('TxHxW') with fewer clips than their batch size: never in a batch."""
  counts = collections.Counter(stream.sizes)
  return ['x'.join(map(str, size)) for size, b in stream.batch_size.items() if counts[size] < b]
