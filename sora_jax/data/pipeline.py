"""Input pipeline: a TFDS data source read through grain into per-process batches.

Each process reads only its own slice of every global batch (records i with
i % process_count == process_index after a seeded global shuffle), batches it, and
`train.py` assembles the global array with `jax.make_array_from_process_local_data`.
The grain iterator is checkpointable: its state is saved with the train state.
"""

import dataclasses

import grain
import numpy as np
import tensorflow_datasets as tfds

from sora_jax.data import shapes
from sora_jax.models import text


@dataclasses.dataclass(frozen=True)
class ToExample(grain.transforms.Map):
  """A TFDS record -> {'video': uint8 [T, H, W, 3], 'tokens': int32 [l], 'token_mask': bool [l]}."""

  max_text_len: int

  def map(self, record):
    caption = record['caption']
    caption = caption.decode('utf-8') if isinstance(caption, bytes) else str(caption)
    tokens, mask = text.tokenize([caption], self.max_text_len)
    return {'video': np.asarray(record['video'], np.uint8), 'tokens': tokens[0], 'token_mask': mask[0]}


def data_source(data_config, split: str):
  """Builds the dataset on first use (seconds for `shapes`) and opens it as a random-access source."""
  if data_config.name != 'shapes':
    raise ValueError(f'config.data.name={data_config.name!r}: only "shapes" is available')
  builder = shapes.build(data_config.data_dir, frames=data_config.frames, height=data_config.height,
                         width=data_config.width, object_size=data_config.object_size,
                         num_train=data_config.num_train, num_validation=data_config.num_validation,
                         seed=data_config.seed)
  return tfds.data_source(f'shapes/{builder.builder_config.name}', split=split,
                          data_dir=builder.data_dir.rsplit('/shapes/', 1)[0])


def make_iterator(source, *, local_batch_size: int, seed: int, max_text_len: int,
                  process_index: int = 0, process_count: int = 1, worker_count: int = 0):
  """An endless, shuffled, checkpointable iterator of this process's batches (numpy dicts)."""
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(ToExample(max_text_len)).batch(local_batch_size, drop_remainder=True)
  ds = ds.to_iter_dataset()
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)
