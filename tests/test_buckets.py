"""Aspect-ratio/duration buckets (sora_jax/data/buckets.py): one size per batch, about the same tokens per step."""

import json
import os
import sys

import numpy as np
import pytest

from sora_jax.data import buckets, packing

PATCH = (1, 8, 8)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))


def test_bucket_batch_sizes_fill_the_token_budget_in_multiples_of_the_data_parallel_size():
  sizes = [(1, 32, 32), (8, 32, 56), (16, 56, 32), (16, 32, 32), (8, 32, 56)]
  out = buckets.batch_sizes(sizes, PATCH, tokens_per_step=2048, multiple=2)
  assert out == {(1, 32, 32): 128, (8, 32, 56): 8, (16, 32, 32): 8, (16, 56, 32): 4}
  for size, b in out.items():
    per_clip = packing.tokens_of(size, PATCH)
    assert b % 2 == 0 and b * per_clip <= 2048 < (b + 2) * per_clip
  assert buckets.batch_sizes([(16, 56, 32)], PATCH, tokens_per_step=100, multiple=4) == {(16, 56, 32): 4}  # at least


def test_the_batch_plan_never_mixes_sizes_and_uses_each_example_at_most_once():
  rng = np.random.default_rng(0)
  choices = [(1, 8, 8), (2, 8, 16), (2, 16, 8)]
  sizes = [choices[i] for i in rng.integers(3, size=200)]
  batch_size = {(1, 8, 8): 8, (2, 8, 16): 4, (2, 16, 8): 4}
  plan = buckets.plan_batches(sizes, batch_size)
  used = [i for batch in plan for i in batch]
  assert len(used) == len(set(used))
  for batch in plan:
    assert len({sizes[i] for i in batch}) == 1 and len(batch) == batch_size[sizes[batch[0]]]
  for size, b in batch_size.items():  # only each size's last partial batch is left for later
    assert sizes.count(size) - sum(sizes[i] == size for i in used) < b
  assert plan == buckets.plan_batches(sizes, batch_size)


@pytest.fixture(scope='module')
def native_source(tmp_path_factory):
  import tensorflow_datasets as tfds
  from sora_jax.data import pipeline, shapes
  path = str(tmp_path_factory.mktemp('tfds'))
  builder = shapes.build(path, sizes='1x8x8,2x8x16,2x16x8', num_train=60, num_validation=4, object_size=6)
  return pipeline.SkipBadRecords(tfds.data_source(f'shapes/{builder.builder_config.name}', split='train',
                                                  data_dir=path), max_text_len=32)


def test_bucketed_batches_are_a_pure_function_of_seed_and_step_for_any_process_count(native_source):
  from sora_jax.data import pipeline
  sizes = pipeline.clip_sizes(native_source)
  stream = buckets.BucketedBatches(native_source, sizes, patch=PATCH, tokens_per_step=16, multiple=2, seed=3)
  assert stream.batch_size == {(1, 8, 8): 16, (2, 8, 16): 4, (2, 16, 8): 4}
  n = len(stream.epoch(0))
  assert 0.7 < stream.epoch_usage(0) <= 1 and stream.epoch(1) != stream.epoch(0)  # reshuffled each epoch
  for k in (0, n - 1, n, n + 2):  # across the epoch boundary
    batch = stream[k]
    indices = stream.batch_examples(k)
    assert batch['video'].shape == (len(indices), *sizes[indices[0]], 3)
    np.testing.assert_array_equal(batch['video'][-1], native_source[indices[-1]]['video'])
    assert batch['tokens'].shape == (len(indices), 32)
    shares = [buckets.BucketedBatches(native_source, sizes, patch=PATCH, tokens_per_step=16, multiple=2, seed=3,
                                      process_index=p, process_count=2)[k] for p in (0, 1)]
    for key in batch:  # two processes' shares make the one-process batch
      np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), batch[key])
  resumed = pipeline.make_iterator(stream, global_batch_size=8, seed=3, max_text_len=32, start_step=n, batched=True)
  np.testing.assert_array_equal(next(resumed)['video'], stream[n]['video'])  # a resumed run reads step n next


@pytest.mark.slow
def test_the_native_config_trains_in_buckets_and_samples_its_sizes(tmp_path):
  from configs import shapes_native
  from sora_jax import sample, train
  config = shapes_native.get_config('tiny')
  config.data.update(data_dir=str(tmp_path / 'tfds'), sizes='1x16x16,2x16x24')  # two sizes: two compiles
  config.packing.row_length = 0
  config.buckets.tokens_per_step = 64  # 16 images (4 tokens: stills) or 8 clips of 2x16x24 (6; one per device)
  config.frame_conditioning.probability = 0.6  # images are never given frames
  config.update(total_steps=4, log_every_steps=1)
  config.sample.prompts = ()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r['train/loss']) for r in rows)
  assert all(r['perf/tokens_per_sec'] > 0 for r in rows[1:])  # after the first window (the compile)
  model = sample.load(workdir)
  assert sample.generate(model, ['a red circle moving right'], size=(2, 16, 24), num_steps=1).shape == (1, 2, 16, 24, 3)


def test_clips_of_several_sizes_need_packing_or_buckets_and_sizes_the_patch_divides():
  from configs import shapes_native
  from sora_jax import UsageError, train
  config = shapes_native.get_config('tiny')
  config.packing.row_length = 0
  with pytest.raises(UsageError, match=r'config.data.sizes=.*need packing .* or buckets'):
    train.validate_config(config, 8)
  config.buckets.tokens_per_step = 64
  train.validate_config(config, 8)
  config.packing.row_length = 32
  with pytest.raises(UsageError, match='choose buckets or packing'):
    train.validate_config(config, 8)
  config.packing.row_length = 0
  for bad in ('2x20x16', '3x16x16'):  # an image (1 frame) fits any temporal patch; 3 frames do not fit 2
    config.data.sizes = f'1x16x16,2x16x16,{bad}'
    dim = 'height=20' if bad == '2x20x16' else 'frames=3'  # the item's own, not config.data.height's
    with pytest.raises(UsageError, match=rf'config.data.sizes: {bad}: config.model.patch=\(2, 8, 8\) does not divide {dim}'):
      train.validate_config(config, 8)
  config.data.sizes = ''
  with pytest.raises(UsageError, match='buckets need clips of several sizes'):
    train.validate_config(config, 8)
  config = shapes_native.get_config('tiny')
  config.data.sizes = '2x16x16,2x48x48'
  with pytest.raises(UsageError, match='2x48x48 is 36 patch tokens, more than config.packing.row_length=32'):
    train.validate_config(config, 8)
  config = shapes_native.get_config('tiny')
  config.objective.shift_base_tokens = -5  # trained NaN before
  with pytest.raises(UsageError, match='shift_base_tokens=-5 must be >= 0'):
    train.validate_config(config, 8)


def test_a_step_counts_only_real_tokens():
  from sora_jax import train
  from sora_jax.models import autoencoder
  from configs import shapes_native
  config, identity = shapes_native.get_config('tiny'), autoencoder.Identity()
  assert tuple(config.model.patch) == (2, 8, 8)
  assert train.real_tokens(config, identity, {'video': np.zeros((3, 2, 16, 24, 3), np.uint8)}) == 3 * 6
  assert train.real_tokens(config, identity, {'video': np.zeros((3, 1, 16, 16, 3), np.uint8)}) == 3 * 4  # stills
  segment_bs = np.array([[1, 1, 2, 0], [1, 0, 0, 0]])
  assert train.real_tokens(config, identity, {'segment_s': segment_bs, 'x_sp': np.zeros((2, 4, 64))}) == 4


def plan(e):  # slow, so that threads reach an epoch boundary together
  import time
  time.sleep(0.01)
  return [[e, i] for i in range(int(np.random.default_rng(e).integers(3, 7)))]


def test_epoch_plans_give_item_k_whatever_threads_read_them_in_whatever_order():
  import concurrent.futures

  sequential = packing.EpochPlans(plan)
  expected = [sequential[k] for k in range(120)]
  shared = packing.EpochPlans(plan)
  order = np.random.default_rng(0).permutation(120)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = dict(zip(order, pool.map(lambda k: shared[int(k)], order)))
  assert [got[k] for k in range(120)] == expected
  import pickle
  assert pickle.loads(pickle.dumps(shared))[119] == expected[119]  # for grain's worker processes


def test_a_size_with_fewer_clips_than_its_batch_is_named_as_never_trained():
  sizes = [(1, 8, 8)] * 20 + [(2, 8, 16)] * 3
  stream = buckets.BucketedBatches([None] * 23, sizes, patch=PATCH, tokens_per_step=16, multiple=2, seed=0)
  assert stream.batch_size == {(1, 8, 8): 16, (2, 8, 16): 4}
  assert buckets.starved(stream) == ['2x8x16']
  assert '2x8x16: batch 4 (16 tokens), 3 clips' in buckets.describe(stream)
