r"""Precompute what the DiT trains on: clips -> VAE latents, captions -> frozen text-encoder embeddings.

  python -m sora_jax.encode --config=configs/shapes.py --workdir=runs/latents \
      --config.autoencoder.kind=wan --config.autoencoder.path=/models/wan/vae --config.data.frames=17 \
      [--config.text_encoder.kind=t5 --config.text_encoder.path=/models/umt5-xxl]

Writes an array_record TFDS dataset to WORKDIR/encoded/ (splits `train` and `validation`), one record
per readable clip of `config.data`: `latent` float32 [t, h, w, c] (normalised, what the DiT
denoises), `label`, `caption`, and either the frozen encoder's `text` float16 [l, d] with its
`text_mask`, or the byte encoder's `tokens` and `token_mask`. Then train without running the VAE
or the text encoder each step (sampling still uses both):

  python -m sora_jax.main --config=configs/shapes.py --workdir=runs/dit <the same autoencoder and
      text-encoder flags> --config.data.name=encoded --config.data.encoded_dir=runs/latents/encoded

Resumable: records are written in shards of --shard_size source records, each committed by a
rename; a rerun skips the committed shards. Multi-process (the flags of `sora_jax.main`): process
p encodes shards p, p + P, ... on its local devices; process 0 writes the metadata at the end.
Unreadable clips are skipped and counted. Long or large clips: `--chunk_frames=16` encodes 16 frames
at a time with the causal cache (equal to the one-shot encode), `--tile=256 --tile_overlap=64`
encodes blended spatial tiles (approximate); memory is then bounded by the chunk and the tile.
"""

import json
import math
import os
import sys
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from jax.experimental import multihost_utils

import sora_jax.text as text_lib
from sora_jax import UsageError, ensure_writable_dir, init_devices, main, quiet_library_logs, sharding
from sora_jax.data import pipeline
from sora_jax.models import autoencoder as autoencoder_lib

flags.DEFINE_integer('shard_size', 256, 'Source records per output shard (the unit of resumption).')
flags.DEFINE_integer('encode_batch_size', 8, 'Clips per encoder call.')
flags.DEFINE_integer('chunk_frames', 0, 'VAE: encode this many frames at a time after frame 0 (a multiple of '
                     'its temporal factor; equal to the one-shot encode, memory bounded by the chunk). 0: whole clips.')
flags.DEFINE_integer('tile', 0, 'VAE: encode spatial tiles of this many pixels, blended over --tile_overlap '
                     '(approximate; for frames too large to encode at once). 0: whole frames.')
flags.DEFINE_integer('tile_overlap', 64, 'Pixels shared by neighbouring tiles (with --tile).')
FLAGS = flags.FLAGS

DATASET = 'encoded'


def dataset_dir(encoded_dir: str) -> str:
  return os.path.join(encoded_dir, pipeline.ENCODED_VERSION)


def features(config, latent_thwc, text_dim: int | None) -> tfds.features.FeaturesDict:
  l = config.data.max_text_len
  spec = {'latent': tfds.features.Tensor(shape=latent_thwc, dtype=np.float32),
          'label': tfds.features.Tensor(shape=(), dtype=np.int32),
          'caption': tfds.features.Text()}
  if text_dim:
    spec.update(text=tfds.features.Tensor(shape=(l, text_dim), dtype=np.float16),
                text_mask=tfds.features.Tensor(shape=(l,), dtype=np.bool_))
  else:
    spec.update(tokens=tfds.features.Tensor(shape=(l,), dtype=np.int32),
                token_mask=tfds.features.Tensor(shape=(l,), dtype=np.bool_))
  return tfds.features.FeaturesDict(spec)


def shard_name(split: str, index: int, count: int) -> str:
  return f'{DATASET}-{split}.array_record-{index:05d}-of-{count:05d}'


def encode_split(config, split: str, out_dir: str, autoencoder, text_encoder, mesh) -> None:
  """Writes this process's shards of `split`; each shard's record count goes to a `.json` beside it."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  source = pipeline.data_source(config.data, split)
  tokenize = text_lib.tokenizer_from_config(config)
  d = config.data
  latent_thwc = (*autoencoder.latent_shape(d.frames, d.height, d.width), autoencoder.channels)
  feats = features(config, latent_thwc, text_encoder.dim if text_encoder else None)
  count = math.ceil(len(source) / FLAGS.shard_size)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = sharding.replicated(mesh)
  ae_params = jax.device_put(autoencoder.params, replicated)
  if FLAGS.chunk_frames or FLAGS.tile:
    if not hasattr(autoencoder, 'encode_bounded'):
      raise UsageError(f'--chunk_frames / --tile need a VAE (config.autoencoder.kind={config.autoencoder.kind!r})')
    encode_video = lambda params, video: autoencoder.encode_bounded(  # noqa: E731
        params, video, chunk_frames=FLAGS.chunk_frames, tile=FLAGS.tile, overlap=FLAGS.tile_overlap)
  else:
    encode_video = jax.jit(autoencoder.encode)
  encode_text = jax.jit(text_encoder.apply) if text_encoder else None
  dp = mesh.devices.size
  mine = range(jax.process_index(), count, jax.process_count())
  begun, done_here = time.perf_counter(), 0
  for shard in mine:
    path = os.path.join(out_dir, shard_name(split, shard, count))
    if os.path.exists(path + '.json'):
      continue  # committed by an earlier run
    start = time.perf_counter()
    indices = range(shard * FLAGS.shard_size, min((shard + 1) * FLAGS.shard_size, len(source)))
    examples, skipped = [], 0
    for i in indices:
      try:
        record = source[i]
        example = pipeline.to_example(record, d.max_text_len, tokenize)
        caption = record['caption']
        example['caption'] = caption.decode('utf-8') if isinstance(caption, bytes) else str(caption)
        examples.append(example)
      except Exception as e:  # noqa: BLE001 -- a broken record is skipped and counted, never fatal
        skipped += 1
        logging.warning('%s %s: skipping record %d: %s: %s', d.name, split, i, type(e).__name__, e)
    writer = array_record_module.ArrayRecordWriter(path + '.tmp', 'group_size:1')
    for first in range(0, len(examples), FLAGS.encode_batch_size):
      chunk = examples[first:first + FLAGS.encode_batch_size]
      n = len(chunk)
      pad = -n % dp  # batches split evenly over the local devices
      stack = lambda key: np.stack([e[key] for e in chunk] + [chunk[-1][key]] * pad)
      video = jax.device_put(stack('video').astype(np.float32) / 127.5 - 1.0, batch_sharding)
      latents = np.asarray(encode_video(ae_params, video))[:n]
      outputs = {'latent': latents}
      if text_encoder:
        text, text_mask = encode_text(text_encoder.params, stack('tokens'), stack('token_mask'))
        text = np.asarray(text, np.float32)[:n]
        if not np.isfinite(text.astype(np.float16)).all():
          raise UsageError(f'{config.text_encoder.path}: text embeddings overflow float16 (|x| > 65504)')
        outputs.update(text=text.astype(np.float16), text_mask=np.asarray(text_mask)[:n])
      for j, example in enumerate(chunk):
        record = {k: v[j] for k, v in outputs.items()}
        record.update(label=np.int32(example['label']), caption=example['caption'])
        if not text_encoder:
          record.update(tokens=example['tokens'], token_mask=example['token_mask'])
        writer.write(feats.serialize_example(record))
    writer.close()
    os.replace(path + '.tmp', path)
    with open(path + '.json.tmp', 'w') as f:
      json.dump({'records': len(examples), 'skipped': skipped}, f)
    os.replace(path + '.json.tmp', path + '.json')  # the commit: a rerun skips this shard
    done_here += 1
    left = sum(1 for s in mine if s > shard)
    eta = (time.perf_counter() - begun) / done_here * left
    logging.info('%s shard %d/%d: %d clips (%d skipped), %.1f clips/s, ETA %.0f s', split, shard + 1, count,
                 len(examples), skipped, len(examples) / (time.perf_counter() - start), eta)


def write_metadata(config, out_dir: str, splits, autoencoder, text_encoder) -> dict:
  """The TFDS metadata over all committed shards; returns {split: {'records', 'skipped'}}."""
  d = config.data
  latent_thwc = (*autoencoder.latent_shape(d.frames, d.height, d.width), autoencoder.channels)
  feats = features(config, latent_thwc, text_encoder.dim if text_encoder else None)
  split_infos, counts = [], {}
  for split in splits:
    count = math.ceil(len(pipeline.data_source(d, split)) / FLAGS.shard_size)
    stats = []
    for shard in range(count):
      with open(os.path.join(out_dir, shard_name(split, shard, count)) + '.json') as f:
        stats.append(json.load(f))
    counts[split] = {key: sum(s[key] for s in stats) for key in ('records', 'skipped')}
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[s['records'] for s in stats],
                                           num_bytes=0, filename_template=None))
  tfds.folder_dataset.write_metadata(data_dir=out_dir, features=feats, split_infos=split_infos,
                                     filename_template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
                                     check_data=False)
  with open(os.path.join(out_dir, pipeline.ENCODED_CONFIG), 'w') as f:
    json.dump({'fixed': pipeline.encoded_fields(config), 'counts': counts}, f, indent=2)
  return counts


def check_bounded_flags(config) -> None:
  """One-line errors for --chunk_frames / --tile / --tile_overlap, before anything is written."""
  if not (FLAGS.chunk_frames or FLAGS.tile):
    return
  if config.autoencoder.kind == 'identity':
    raise UsageError('--chunk_frames / --tile need a VAE (config.autoencoder.kind="identity" has nothing to bound)')
  cfg = autoencoder_lib.make(config.autoencoder, load_weights=False).cfg
  tf, sf = cfg.temporal_factor, cfg.spatial_factor
  if FLAGS.chunk_frames < 0 or FLAGS.chunk_frames % tf:
    raise UsageError(f'--chunk_frames={FLAGS.chunk_frames}: use a positive multiple of the VAE\'s temporal factor {tf} (0: whole clips)')
  if FLAGS.tile and (FLAGS.tile < 0 or FLAGS.tile % sf or FLAGS.tile_overlap % sf or not 0 <= FLAGS.tile_overlap < FLAGS.tile):
    raise UsageError(f'--tile={FLAGS.tile} --tile_overlap={FLAGS.tile_overlap}: use multiples of the VAE\'s spatial '
                     f'factor {sf} with 0 <= overlap < tile')


def encode(config, workdir: str) -> str:
  """Encodes `config.data` into WORKDIR/encoded (see the module docstring); returns that folder."""
  from sora_jax import train  # pylint: disable=g-import-not-at-top
  train.validate_config(config, jax.device_count())
  if config.data.name == 'encoded':
    raise UsageError('config.data.name="encoded": give the source dataset (shapes, folder) to encode')
  encoded_dir = os.path.join(workdir, DATASET)
  out_dir = dataset_dir(encoded_dir)
  ensure_writable_dir(out_dir, f'--workdir={workdir}')
  check_bounded_flags(config)
  fields = {**pipeline.encoded_fields(config), 'tile': FLAGS.tile, 'tile_overlap': FLAGS.tile_overlap if FLAGS.tile else 0}
  started = os.path.join(out_dir, 'encode_started.json')  # resuming must not mix two configs' shards
  if os.path.exists(started):
    with open(started) as f:
      previous = json.load(f)
    if {k: previous.get(k, 0) for k in fields} != fields:  # (tiles: approximate latents are not exact ones)
      raise UsageError(f'{encoded_dir} holds an encoding of another config or --tile ({started}): use another --workdir')
  elif jax.process_index() == 0:
    with open(started, 'w') as f:
      json.dump(fields, f, indent=2)
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1, sequence=1), devices=jax.local_devices())
  autoencoder = autoencoder_lib.make(config.autoencoder)
  text_encoder = text_lib.from_config(config, mesh, sharding.rules_tuple(config.sharding_rules))
  splits = ['train'] + (['validation'] if config.data.get('num_validation', 1) else [])
  with jax.set_mesh(mesh):
    for split in splits:
      encode_split(config, split, out_dir, autoencoder, text_encoder, mesh)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('encoded')
  if jax.process_index() == 0:
    counts = write_metadata(config, out_dir, splits, autoencoder, text_encoder)
    logging.info('encoded %s into %s', counts, encoded_dir)
  return encoded_dir


def run(argv):
  del argv
  quiet_library_logs()
  main.initialize_distributed()
  init_devices()
  try:
    encoded_dir = encode(FLAGS.config, FLAGS.workdir)
  except UsageError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')
  print(f'{encoded_dir}: train with --config.data.name=encoded --config.data.encoded_dir={encoded_dir}')


if __name__ == '__main__':
  app.run(run)
