"""Input pipeline: a TFDS data source read through grain into per-process batches.

Each process reads only its own slice of every global batch (records i with
i % process_count == process_index after a seeded global shuffle), batches it, and
`train.py` assembles the global array with `jax.make_array_from_process_local_data`.
The grain iterator is checkpointable: its state is saved with the train state.
"""

import threading

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sora_jax import UsageError
from sora_jax.data import shapes
from sora_jax.models import text


class SkipBadRecords:
  """Wraps a random-access source: a record that fails to read or decode becomes None.

  `make_iterator` filters the Nones out before batching, so shapes stay static; `skipped` counts
  them (in this process) and the first few are logged with their index. A whole source's worth of
  failures in a row means nothing is usable: that raises instead of spinning forever.
  """

  def __init__(self, source, max_text_len: int, name: str = 'the dataset'):
    if not len(source):
      raise UsageError(f'{name} has no records')
    self.source = source
    self.max_text_len = max_text_len
    self.name = name
    self.skipped = 0
    self._failed_in_a_row = 0
    self._lock = threading.Lock()  # grain reads records from several threads

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    try:
      example = to_example(self.source[index], self.max_text_len)
    except Exception as e:  # noqa: BLE001 -- any broken record is skipped, never fatal
      with self._lock:
        self.skipped += 1
        self._failed_in_a_row += 1
        skipped, in_a_row = self.skipped, self._failed_in_a_row
      if skipped <= 10:
        logging.warning('%s: skipping record %d: %s: %s', self.name, index, type(e).__name__, e)
      if in_a_row >= len(self.source):
        raise UsageError(f'{self.name} has no usable record: the last {in_a_row} read all failed '
                         f'(record {index}: {type(e).__name__}: {e})') from None
      return None
    with self._lock:
      self._failed_in_a_row = 0
    return example


def to_example(record, max_text_len: int) -> dict:
  """A TFDS record -> {'video': uint8 [T, H, W, 3], 'tokens': int32 [l], 'token_mask': bool [l]}."""
  caption = record['caption']
  caption = caption.decode('utf-8') if isinstance(caption, bytes) else str(caption)
  video = np.asarray(record['video'])
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f'video of dtype {video.dtype} and shape {video.shape}, expected uint8 [T, H, W, 3]')
  tokens, mask = text.tokenize([caption], max_text_len)
  return {'video': video, 'tokens': tokens[0], 'token_mask': mask[0]}


def data_source(data_config, split: str):
  """Builds the dataset on first use (seconds for `shapes`) and opens it as a random-access source."""
  if data_config.name != 'shapes':
    raise UsageError(f'config.data.name={data_config.name!r}: only "shapes" is available')
  try:
    builder = shapes.build(data_config.data_dir, frames=data_config.frames, height=data_config.height,
                           width=data_config.width, object_size=data_config.object_size,
                           num_train=data_config.num_train, num_validation=data_config.num_validation,
                           seed=data_config.seed)
  except OSError as e:
    raise UsageError(f'config.data.data_dir={data_config.data_dir!r}: cannot build or read the dataset '
                     f'there: {e.strerror or e}') from None
  return tfds.data_source(f'shapes/{builder.builder_config.name}', split=split,
                          data_dir=builder.data_dir.rsplit('/shapes/', 1)[0])


def make_iterator(source, *, local_batch_size: int, seed: int, max_text_len: int,
                  process_index: int = 0, process_count: int = 1, worker_count: int = 0):
  """An endless, shuffled, checkpointable iterator of this process's batches (numpy dicts).

  Records that fail to read or decode are skipped (see `SkipBadRecords`).
  """
  if not isinstance(source, SkipBadRecords):
    source = SkipBadRecords(source, max_text_len)
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset().filter(lambda example: example is not None)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)
