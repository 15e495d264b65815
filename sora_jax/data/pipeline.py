"""Input pipeline: a TFDS data source read through grain into per-process batches.

The data order is a pure function of the data seed and the step, whatever the process count:
the global batch of step k is records [k * B, (k + 1) * B) of a seeded, per-epoch reshuffled
stream, and process p of P reads and decodes only its contiguous share of it,
[k * B + p * B / P, k * B + (p + 1) * B / P). `train.py` assembles the global array with
`jax.make_array_from_process_local_data`, which puts process p's rows on its devices. So there
is no iterator state to checkpoint: a run resumes at any step on any number of processes.
"""

import json
import os
import threading

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from sora_jax import UsageError
from sora_jax.data import folder, shapes
from sora_jax.text import byte as text

ENCODED_VERSION = '1.0.0'


class SkipBadRecords:
  """Wraps a random-access source: a record that fails to read or decode is replaced by the next
  readable one (index + 1, + 2, ...), so batches keep their shape and the data order stays a pure
  function of the index. `skipped` counts the failures (in this process) and the first few are
  logged with their index. A whole source's worth of failures means nothing is usable: that
  raises instead of spinning forever.
  """

  def __init__(self, source, max_text_len: int, name: str = 'the dataset', tokenize=text.tokenize):
    if not len(source):
      raise UsageError(f'{name} has no records')
    self.source = source
    self.max_text_len = max_text_len
    self.tokenize = tokenize
    self.name = name
    self.skipped = 0
    self._lock = threading.Lock()  # grain reads records from several threads

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    for offset in range(len(self.source)):
      i = (index + offset) % len(self.source)
      try:
        return to_example(self.source[i], self.max_text_len, self.tokenize)
      except Exception as e:  # noqa: BLE001 -- any broken record is skipped, never fatal
        with self._lock:
          self.skipped += 1
          skipped = self.skipped
        if skipped <= 10:
          logging.warning('%s: skipping record %d: %s: %s', self.name, i, type(e).__name__, e)
        error = e
    raise UsageError(f'{self.name} has no usable record: all {len(self.source)} failed to read '
                     f'(record {index}: {type(error).__name__}: {error})') from None


class Subset:
  """The records `indices` of a random-access source, as a source of their own (e.g. the clips of one
  size: wrap it in `SkipBadRecords`, so a broken record is replaced by another of the subset)."""

  def __init__(self, source, indices):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]


# An `encoded` dataset (`sora_jax.encode`) fixes these fields of the training config.
ENCODED_FIXED = ('autoencoder', 'text_encoder', 'data.frames', 'data.height', 'data.width', 'data.max_text_len')
ENCODED_CONFIG = 'encode_config.json'


def is_encoded(data_config) -> bool:
  """Whether the data are precomputed latents (and text embeddings) rather than clips."""
  return data_config.name == 'encoded'


def encoded_fields(config) -> dict:
  """The values of `ENCODED_FIXED` in a training config, JSON-ready."""
  out = {}
  for field in ENCODED_FIXED:
    value = config
    for name in field.split('.'):
      value = value.get(name) if hasattr(value, 'get') else None
    out[field] = json.loads(json.dumps(value.to_dict() if hasattr(value, 'to_dict') else value))
  return out


def check_encoded(config) -> None:
  """UsageError unless `config.data.encoded_dir` holds an encoding made with this config's
  autoencoder, text encoder and clip size (one line naming the first field that differs)."""
  encoded_dir = config.data.get('encoded_dir')
  if not encoded_dir:
    raise UsageError('config.data.name="encoded" needs config.data.encoded_dir (WORKDIR/encoded of sora_jax.encode)')
  path = os.path.join(encoded_dir, ENCODED_VERSION, ENCODED_CONFIG)
  if not os.path.exists(path):
    raise UsageError(f'config.data.encoded_dir={encoded_dir!r}: no {ENCODED_VERSION}/{ENCODED_CONFIG} '
                     f'(run sora_jax.encode to the end first)')
  with open(path) as f:
    fixed = json.load(f)['fixed']
  for field, value in encoded_fields(config).items():
    if fixed.get(field) != value:
      raise UsageError(f'config.{field}={value!r}, but {encoded_dir} was encoded with {fixed.get(field)!r}: '
                       f'use the same value')


def to_example(record, max_text_len: int, tokenize=text.tokenize) -> dict:
  """A TFDS record -> {'video': uint8 [T, H, W, 3], 'tokens': int32 [l], 'token_mask': bool [l],
  'label': int32 []} (the class, for class-conditional models: `shapes.class_label`, -1 for data
  without classes).

  `tokenize(texts, max_len) -> (ids, mask)` is the text encoder's: bytes by default, T5's
  sentencepiece for a frozen encoder (`sora_jax.text.tokenizer_from_config`).
  """
  if 'latent' in record:  # an `encoded` record: the text is already tokens or embeddings
    keys = ('latent', 'text', 'text_mask') if 'text' in record else ('latent', 'tokens', 'token_mask')
    return {**{k: np.asarray(record[k]) for k in keys}, 'label': np.int32(record['label'])}
  caption = record['caption']
  caption = caption.decode('utf-8') if isinstance(caption, bytes) else str(caption)
  video = np.asarray(record['video'])
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f'video of dtype {video.dtype} and shape {video.shape}, expected uint8 [T, H, W, 3]')
  tokens, mask = tokenize([caption], max_text_len)
  if all(key in record for key in ('color', 'shape', 'direction')):
    label = shapes.class_label(record['color'], record['shape'], record['direction'])
  else:  # no class (e.g. `folder` clips): -1 keeps the keys the same for every dataset
    label = -1
  return {'video': video, 'tokens': tokens[0], 'token_mask': mask[0], 'label': np.int32(label)}


def data_source(data_config, split: str):
  """Builds the dataset on first use (seconds for `shapes`; for `folder`, about a decode of each clip's
  start) and opens it as a random-access source."""
  if data_config.name == 'folder':
    return _folder_source(data_config, split)
  if is_encoded(data_config):
    directory = os.path.join(data_config.encoded_dir, ENCODED_VERSION)
    return tfds.builder_from_directory(directory).as_data_source(split=split)
  if data_config.name != 'shapes':
    raise UsageError(f'config.data.name={data_config.name!r}: expected "shapes" (synthetic clips), '
                     f'"folder" (your clips in config.data.folder) or "encoded" (sora_jax.encode\'s latents)')
  try:
    builder = shapes.build(data_config.data_dir, frames=data_config.frames, height=data_config.height,
                           width=data_config.width, object_size=data_config.object_size,
                           num_train=data_config.num_train, num_validation=data_config.num_validation,
                           seed=data_config.seed, sizes=data_config.get('sizes') or '')
  except OSError as e:
    raise UsageError(f'config.data.data_dir={data_config.data_dir!r}: cannot build or read the dataset '
                     f'there: {e.strerror or e}') from None
  return tfds.data_source(f'shapes/{builder.builder_config.name}', split=split,
                          data_dir=builder.data_dir.rsplit('/shapes/', 1)[0])


def _folder_source(data_config, split: str):
  """`data_source` for `config.data.folder`, a folder of the user's clips (`sora_jax.data.folder`)."""
  clips = data_config.get('folder')
  if not clips:
    raise UsageError('config.data.name="folder" needs config.data.folder, the folder of video clips')
  try:
    builder = folder.build(clips, data_config.data_dir, frames=data_config.frames, height=data_config.height,
                           width=data_config.width, fps=data_config.get('fps', 8),
                           validation_fraction=data_config.get('validation_fraction', 0.05),
                           sizes=data_config.get('sizes') or '')
  except OSError as e:
    raise UsageError(f'config.data.data_dir={data_config.data_dir!r}: cannot build or read the dataset '
                     f'there: {e.strerror or e}') from None
  if split not in builder.info.splits:  # a folder with one readable clip has no validation split
    raise UsageError(f'config.data.folder={clips!r}: no {split!r} split ({folder.summary(builder)})')
  return tfds.data_source(f'{builder.name}/{builder.builder_config.name}', split=split,
                          data_dir=str(builder.data_dir_root))


def clip_sizes(source) -> list[tuple[int, int, int]]:
  """Each example's (T, H, W) (reads every record once: seconds for `shapes`)."""
  return [tuple(source[i]['video'].shape[:3]) for i in range(len(source))]


def make_iterator(source, *, global_batch_size: int, seed: int, max_text_len: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1, worker_count: int = 0, shuffle: bool = True,
                  batched: bool = False):
  """This process's batches for steps start_step, start_step + 1, ... (an endless iterator).

  Each is `global_batch_size / process_count` examples (numpy dicts), this process's contiguous
  share of the step's global batch; see the module docstring. Unreadable records are replaced
  (see `SkipBadRecords`). `shuffle=False`: `source` is an endless stream already in its order
  (packed rows); `batched`: its item k is already this process's batch of step k (buckets).
  """
  if global_batch_size % process_count:
    raise UsageError(f'config.batch_size={global_batch_size} does not split over {process_count} processes')
  if batched:  # sora_jax.data.buckets: item k is this process's batch of step k, sized by its bucket
    ds = grain.MapDataset.source(source)[start_step:]
  else:
    if not shuffle:  # an endless stream already in its order (packed rows: sora_jax.data.packing)
      ds = grain.MapDataset.source(source)
    else:
      if not isinstance(source, SkipBadRecords):
        source = SkipBadRecords(source, max_text_len)
      ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()  # reshuffled every epoch
    ds = ds.batch(global_batch_size // process_count)  # [i * b, (i + 1) * b) of the stream
    ds = ds[process_index::process_count][start_step:]  # step k: local batch k * P + p
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=4))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)
