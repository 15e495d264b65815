"""Sequence packing: the spacetime patch tokens of several samples of any size in one fixed-length row.

A row holds samples one after another, each as its `patchify` tokens in (t, h, w) raster order,
then padding. Every token carries its sample's segment id (1, 2, ...; 0 is padding) and its (t, h, w)
position inside its own sample, so the DiT (`DiT.forward_packed`) attends within samples, conditions
each on its own timestep and caption, and places tokens by their own positions. Shapes are static
(row length, samples per row), so one compiled step serves every mix of sizes.

Pure numpy: it runs in the input pipeline, on the host.
"""

import bisect
import math
import threading

import numpy as np

from sora_jax.models.dit import grid_positions, patchify, repeat_stills, still_frames  # numpy in, numpy out


def tokens_of(shape_thw: tuple[int, int, int], patch: tuple[int, int, int]) -> int:
  """The number of patch tokens of a latent clip [T, H, W] (the patch must divide it; an image,
  T = 1, is a still clip of the temporal patch: `dit.still_frames`)."""
  t, h, w = shape_thw
  return math.prod(n // p for n, p in zip((still_frames(t, patch[0]), h, w), patch))


def aligned(tokens: int, align: int) -> int:
  """The row tokens a sample of `tokens` takes when samples start at multiples of `align`."""
  return -(-tokens // align) * align


def pack(latents: list, patch: tuple[int, int, int], length: int, max_segments: int | None = None,
         align: int = 1) -> dict:
  """One row: `latents` (each [T, H, W, c], any T, H, W the patch divides; images, T = 1, as still
  clips of the temporal patch) packed in order, each starting at a multiple of `align` tokens (the
  attention's query block: `layers.PackedLayout`).

  -> x_sp [length, p] float32 (padding 0), segment_s int32 [length] (1..n, 0 padding),
     pos_s3 int32 [length, 3] (padding 0), grids [(t, h, w)] per sample (to unpack outputs).
  Raises ValueError if the samples need more than `length` tokens (or `max_segments` slots).
  """
  if max_segments is not None and len(latents) > max_segments:
    raise ValueError(f'{len(latents)} samples in a row of {max_segments} slots')
  grids = []
  latents = [repeat_stills(np.asarray(x)[None], patch[0])[0] for x in latents]
  for x in latents:
    if any(n % p for n, p in zip(x.shape[:3], patch)):
      raise ValueError(f'patch {tuple(patch)} does not divide a sample of shape {x.shape[:3]}')
    grids.append(tuple(n // p for n, p in zip(x.shape[:3], patch)))
  used = sum(aligned(math.prod(g), align) for g in grids[:-1]) + (math.prod(grids[-1]) if grids else 0)
  if used > length:
    raise ValueError(f'{len(latents)} samples need {used} tokens, more than the row length {length}')
  values = math.prod(patch) * latents[0].shape[-1]
  x_sp = np.zeros((length, values), np.float32)
  segment_s = np.zeros((length,), np.int32)
  pos_s3 = np.zeros((length, 3), np.int32)
  start = 0
  for i, (x, grid) in enumerate(zip(latents, grids)):
    end = start + math.prod(grid)
    x_sp[start:end] = patchify(np.asarray(x, np.float32)[None], patch)[0]
    segment_s[start:end] = i + 1
    pos_s3[start:end] = grid_positions(grid)
    start = aligned(end, align)
  return dict(x_sp=x_sp, segment_s=segment_s, pos_s3=pos_s3, grids=grids)


def unpack(y_sp: np.ndarray, grids: list, patch: tuple[int, int, int], channels: int, align: int = 1) -> list:
  """The samples [T, H, W, c] of one packed row's tokens [length, p] (inverse of `pack`)."""
  out, start = [], 0
  pt, ph, pw = patch
  for t, h, w in grids:
    end = start + t * h * w
    x = np.asarray(y_sp[start:end]).reshape(t, h, w, pt, ph, pw, channels).transpose(0, 3, 1, 4, 2, 5, 6)
    out.append(x.reshape(t * pt, h * ph, w * pw, channels))
    start = aligned(end, align)
  return out


def plan_rows(token_counts, length: int, max_segments: int, open_rows: int = 16, align: int = 1) -> list[list[int]]:
  """Which samples go in which row: [[sample index, ...], ...], every sample once, in a fixed order.

  First fit over a window of `open_rows` rows: each sample (in the given order, e.g. an epoch's
  shuffled order) goes to the first open row with room for its tokens (rounded up to a multiple of
  `align`: see `pack`) and a free slot (of `max_segments`), else opens a row; when more than
  `open_rows` are open, the fullest is closed. Deterministic, so a step's rows are a function of
  the order alone. Raises ValueError for a sample longer than a row.
  """
  rows, open_ = [], []  # open_: [[used tokens, [indices]], ...]
  for i, n in enumerate(token_counts):
    if n > length:
      raise ValueError(f'sample {i} has {n} tokens, more than the row length {length}')
    n = aligned(int(n), align)  # (a multiple of align when the length is)
    for row in open_:
      if row[0] + n <= length and len(row[1]) < max_segments:
        row[0] += n
        row[1].append(i)
        break
    else:
      open_.append([n, [i]])
      if len(open_) > open_rows:
        fullest = max(range(len(open_)), key=lambda r: open_[r][0])
        rows.append(open_.pop(fullest)[1])
  rows.extend(row[1] for row in open_)
  return rows


def efficiency(segment_bs: np.ndarray) -> float:
  """The share of tokens that are not padding."""
  return float(np.mean(np.asarray(segment_bs) > 0))


class EpochPlans:
  """Item k of an endless stream made of epochs laid end to end: `plan(e)` -> epoch e's items (each a
  list of example indices), made on first use and kept. Thread-safe (grain reads from several
  threads), so item k is a function of k alone, however the reads interleave."""

  def __init__(self, plan):
    self.plan = plan
    self._epochs = []  # per epoch: its items
    self._starts = [0]  # the stream index of each epoch's first item
    self._lock = threading.Lock()

  def __getstate__(self):  # picklable for grain's worker processes: without the lock
    return {k: v for k, v in self.__dict__.items() if k != '_lock'}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def epoch(self, e: int) -> list:
    with self._lock:
      while len(self._epochs) <= e:
        items = self.plan(len(self._epochs))
        self._epochs.append(items)
        self._starts.append(self._starts[-1] + len(items))
      return self._epochs[e]

  def __getitem__(self, k: int) -> list:
    while self._starts[-1] <= k:
      self.epoch(len(self._epochs))
    e = bisect.bisect_right(self._starts, k) - 1
    return self.epoch(e)[k - self._starts[e]]


class PackedRows:
  """An endless random-access stream of packed rows over a source of examples (`pipeline.to_example`
  dicts with 'video' uint8 [T, H, W, 3] of any size, or 'latent' [T, H, W, c]).

  Epoch e visits every example once, in a seeded shuffled order, and `plan_rows` groups them into
  rows; row r of the stream is the r-th row of the epochs laid end to end. So a step's rows are a
  pure function of (seed, step): any process reads any row, and nothing needs checkpointing.
  `token_counts[i]` is example i's number of patch tokens (known before reading it).

  row -> {'x_sp' float32 [length, p] (pixels in [-1, 1] or latents), 'segment_s' int32 [length],
  'pos_s3' int32 [length, 3], 'tokens' int32 [max_segments, l], 'token_mask' bool [max_segments, l]
  (unused slots: all False), 'frames_n' int32 [max_segments] (0: unused slot)}.
  """

  def __init__(self, source, token_counts, *, patch, length: int, max_segments: int, seed: int, align: int = 1,
               examples=None, open_rows: int = 64):
    self.source, self.patch, self.length, self.max_segments, self.seed = source, tuple(patch), length, max_segments, seed
    self.align = align  # each sample starts at a multiple of align tokens (see `pack`)
    self.open_rows = open_rows  # `plan_rows`' window: rows of few slots fill better from a wider one
    self.counts = np.asarray(token_counts)
    # The example indices an epoch visits (e.g. the clips of some sizes only); None: all.
    self.examples = np.arange(len(self.counts)) if examples is None else np.asarray(examples, np.int64)
    if not len(self.examples):
      raise ValueError('PackedRows: no examples to pack')
    self._plans = EpochPlans(self._plan)

  def __len__(self):
    return 2**40  # endless; grain needs a length

  def epoch_efficiency(self, e: int = 0) -> float:
    """The share of epoch e's row tokens that are not padding."""
    rows = self.epoch(e)
    return float(sum(self.counts[i] for row in rows for i in row) / (len(rows) * self.length))

  def _plan(self, e: int) -> list:
    order = self.examples[np.random.default_rng([self.seed, e]).permutation(len(self.examples))]
    rows = plan_rows(self.counts[order], self.length, self.max_segments, self.open_rows, self.align)
    return [[int(order[i]) for i in row] for row in rows]

  def epoch(self, e: int) -> list:
    """Epoch e's rows: lists of example indices."""
    return self._plans.epoch(e)

  def row_examples(self, r: int) -> list:
    """The example indices of stream row r."""
    return self._plans[r]

  def step_tokens(self, step: int, rows_per_step: int) -> int:
    """The real (not padding) patch tokens of step `step`'s rows, all processes' together."""
    return int(sum(self.counts[i] for r in range(step * rows_per_step, (step + 1) * rows_per_step)
                   for i in self.row_examples(r)))

  def __getitem__(self, r: int) -> dict:
    examples = [self.source[i] for i in self.row_examples(int(r))]
    xs = [np.asarray(x['latent'], np.float32) if 'latent' in x else x['video'].astype(np.float32) / 127.5 - 1.0
          for x in examples]
    row = pack(xs, self.patch, self.length, self.max_segments, self.align)
    l = examples[0]['tokens'].shape[0]
    tokens = np.zeros((self.max_segments, l), np.int32)
    mask = np.zeros((self.max_segments, l), bool)
    frames = np.zeros((self.max_segments,), np.int32)
    for i, (x, ex) in enumerate(zip(xs, examples)):
      tokens[i], mask[i], frames[i] = ex['tokens'], ex['token_mask'], x.shape[0]
    return dict(x_sp=row['x_sp'], segment_s=row['segment_s'], pos_s3=row['pos_s3'], tokens=tokens,
                token_mask=mask, frames_n=frames)


class Curriculum:
  """Stream rows of `first` for the first `first_rows` rows, then those of `then` (from its row 0):
  e.g. short, small clips only for the first steps, then every size (`config.packing.curriculum_*`).
  Both pack examples of one source, so a row is still a pure function of (seed, row). `first` None:
  the first steps read something else (fixed-size batches: `train.fixed_size_curriculum`), and their
  rows are an error to read."""

  def __init__(self, first: PackedRows | None, first_rows: int, then: PackedRows):
    self.first, self.first_rows, self.then = first, first_rows, then
    self.counts = then.counts

  def __len__(self):
    return 2**40

  def _first(self, r: int) -> PackedRows:
    if self.first is None:
      raise IndexError(f'row {r} is one of the first {self.first_rows}, which this stream does not hold')
    return self.first

  def row_examples(self, r: int) -> list:
    return self._first(r).row_examples(r) if r < self.first_rows else self.then.row_examples(r - self.first_rows)

  step_tokens = PackedRows.step_tokens  # from self.counts and self.row_examples

  def __getitem__(self, r: int) -> dict:
    r = int(r)
    return self._first(r)[r] if r < self.first_rows else self.then[r - self.first_rows]
