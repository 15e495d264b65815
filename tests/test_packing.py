"""Sequence packing: samples of any size in one row behave exactly as each alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.data import packing
from sora_jax.models import dit
from sora_jax.text import byte

PATCH = (2, 4, 4)


def random_dit(**kw):
  """A tiny DiT with every parameter random (adaLN-Zero's zeros would hide conditioning bugs)."""
  model = dit.DiT(channels=3, patch=PATCH, width=32, depth=2, num_heads=4, text_width=16, text_depth=1,
                  text_heads=2, frame_conditioning=True, rngs=nnx.Rngs(0), **kw)
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(tree, leaves)


def test_pack_and_unpack_round_trip_and_mark_segments_and_positions():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3))  # 2x2x3 = 12 and 1x1x2 = 2 tokens
  row = packing.pack([a, b], PATCH, length=16)
  np.testing.assert_array_equal(row['segment_s'], [1] * 12 + [2] * 2 + [0] * 2)
  np.testing.assert_array_equal(row['pos_s3'][12:14], [[0, 0, 0], [0, 0, 1]])
  np.testing.assert_array_equal(row['pos_s3'][:12], dit.grid_positions((2, 2, 3)))
  back = packing.unpack(row['x_sp'], row['grids'], PATCH, 3)
  np.testing.assert_allclose(back[0], a, rtol=1e-6)
  np.testing.assert_allclose(back[1], b, rtol=1e-6)
  assert packing.efficiency(row['segment_s'][None]) == 14 / 16
  with pytest.raises(ValueError, match='need 14 tokens, more than the row length 8'):
    packing.pack([a, b], PATCH, length=8)
  with pytest.raises(ValueError, match='does not divide'):
    packing.pack([rng.normal(size=(3, 8, 8, 3))], PATCH, length=16)
  with pytest.raises(ValueError, match='2 samples in a row of 1 slots'):
    packing.pack([a, b], PATCH, length=16, max_segments=1)
  with pytest.raises(ValueError, match='class-conditional'):
    dit.DiT(channels=3, patch=PATCH, width=8, depth=1, num_heads=2, conditioning='class', num_classes=2,
            rngs=nnx.Rngs(0)).forward_packed(row['x_sp'][None], np.zeros((1, 2)), row['segment_s'][None],
                                             row['pos_s3'][None])


def test_per_block_conditioning_equals_per_token_on_block_aligned_rows():
  values_bnx = jax.random.normal(jax.random.key(0), (2, 3, 5))
  segment_bs = jnp.array([[1] * 8 + [2] * 5 + [0] * 3 + [3] * 4 + [0] * 4,  # samples start at multiples of 4
                          [2] * 4 + [1] * 12 + [0] * 8])
  per_block = dit.per_token(values_bnx, segment_bs, 4)
  expected = jnp.take_along_axis(values_bnx, jnp.maximum(segment_bs - 1, 0)[..., None], axis=1)
  real = (segment_bs > 0)[..., None]  # padding tokens' values are unused
  np.testing.assert_array_equal(jnp.where(real, per_block, 0), jnp.where(real, expected, 0))
  np.testing.assert_array_equal(dit.per_token(values_bnx, segment_bs), expected)


def test_a_packed_row_gives_each_sample_the_output_and_gradients_it_gets_alone():
  layout = (4, 12)  # blocks of 4 queries, windows of 12 (and below: whole rows, masked, give the same)
  graphdef, params = random_dit()
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3))  # a wide clip and a short small one
  captions = ['a red circle moving right', 'a blue square', '']  # the third slot is unused
  tokens, mask = byte.tokenize(captions, 16)
  t = np.array([0.3, 0.8, 0.5], np.float32)
  frame_mask_a = np.array([True, False, False, False])  # a's first frame given (frame conditioning)
  row = packing.pack([a, b], PATCH, length=16, align=layout[0])
  given_sk = np.zeros((16, PATCH[0]), bool)
  given_sk[:12] = np.repeat(frame_mask_a.reshape(2, PATCH[0]), 2 * 3, axis=0)  # t-major tokens
  w_sp = jnp.asarray(rng.normal(size=(16, 4 * 4 * 2 * 3)), jnp.float32)  # a random read-out

  def packed(params, layout):
    return nnx.merge(graphdef, params).forward_packed(
        row['x_sp'][None], t[None], row['segment_s'][None], row['pos_s3'][None], tokens[None], mask[None],
        frame_mask_bsk=given_sk[None], layout=layout)[0]

  def packed_loss(params):
    out = packed(params, layout)
    return jnp.sum(jnp.where(row['segment_s'][:, None] > 0, out * w_sp, 0) ** 2), out

  def alone(params, x, i, frame_mask=None):
    out = nnx.merge(graphdef, params)(jnp.asarray(x, jnp.float32)[None], t[i:i + 1], tokens[i:i + 1],
                                      mask[i:i + 1], frame_mask_bt=frame_mask)
    return dit.patchify(out, PATCH)[0]

  def alone_loss(params):
    out_a, out_b = alone(params, a, 0, frame_mask_a[None]), alone(params, b, 1)
    return jnp.sum((out_a * w_sp[:12]) ** 2) + jnp.sum((out_b * w_sp[12:14]) ** 2), (out_a, out_b)

  (loss, out), grads = jax.jit(jax.value_and_grad(packed_loss, has_aux=True))(params)
  (loss_ref, (out_a, out_b)), grads_ref = jax.jit(jax.value_and_grad(alone_loss, has_aux=True))(params)
  scale = float(jnp.abs(out_a).max())  # outputs of tens: float32 round-off ~1e-6 relative
  np.testing.assert_allclose(out[:12], out_a, atol=1e-5 * scale, rtol=1e-5)
  np.testing.assert_allclose(out[12:14], out_b, atol=1e-5 * scale, rtol=1e-5)
  whole_rows = jax.jit(packed, static_argnums=1)(params, None)
  np.testing.assert_allclose(whole_rows[:14], out[:14], atol=1e-5 * scale, rtol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  flat, flat_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
  assert len(flat) == len(flat_ref)
  for g, g_ref in zip(flat, flat_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4 * float(jnp.abs(g_ref).max() + 1e-6), rtol=1e-4)


@pytest.mark.parametrize('weighting', ['sample', 'token'])
def test_the_packed_loss_is_the_per_sample_loss_and_padding_costs_nothing(weighting):
  from sora_jax.diffusion import rectified_flow as rf
  graphdef, params = random_dit()
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(4, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3))
  na, nb = rng.normal(size=a.shape), rng.normal(size=b.shape)
  tokens, mask = byte.tokenize(['a red circle moving right', 'a blue square', ''], 16)
  t = np.array([0.3, 0.8, 0.5], np.float32)
  given_a = np.array([True, False, False, False])
  row, noise = packing.pack([a, b], PATCH, 16), packing.pack([na, nb], PATCH, 16)
  given_sk = np.zeros((16, PATCH[0]), bool)
  given_sk[:12] = np.repeat(given_a.reshape(2, PATCH[0]), 6, axis=0)
  kw = dict(prediction_type='x0', min_t=0.3)

  def packed(params):
    net = nnx.merge(graphdef, params)
    apply = lambda x_t, t_bn: net.forward_packed(x_t, t_bn, row['segment_s'][None], row['pos_s3'][None],
                                                 tokens[None], mask[None], frame_mask_bsk=given_sk[None])
    return rf.packed_loss(apply, row['x_sp'][None], noise['x_sp'][None], t[None], row['segment_s'][None],
                          weighting=weighting, given_bsk=given_sk[None], **kw)

  def alone(params):
    net = nnx.merge(graphdef, params)
    losses = []
    for i, (x, e, given) in enumerate(((a, na, given_a[None]), (b, nb, None))):
      apply = lambda x_t, t_b: net(x_t, t_b, tokens[i:i + 1], mask[i:i + 1], frame_mask_bt=given)
      losses.append(rf.loss(apply, jnp.asarray(x[None], jnp.float32), jnp.asarray(e[None], jnp.float32),
                            jnp.asarray(t[i:i + 1]), given_bt=given, **kw)[0])
    if weighting == 'sample':
      return (losses[0] + losses[1]) / 2, jnp.stack(losses)
    generated = (3 * 8 * 12 * 3, 2 * 4 * 8 * 3)  # values outside given frames
    return (losses[0] * generated[0] + losses[1] * generated[1]) / sum(generated), jnp.stack(losses)

  (loss, per_slot), grads = jax.jit(jax.value_and_grad(packed, has_aux=True))(params)
  (loss_ref, per_sample), grads_ref = jax.jit(jax.value_and_grad(alone, has_aux=True))(params)
  np.testing.assert_allclose(per_slot[0, :2], per_sample, rtol=1e-5)
  assert per_slot[0, 2] == 0  # the empty slot
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=1e-4 * float(jnp.abs(g_ref).max() + 1e-6), rtol=1e-4)


def test_an_image_packs_as_a_still_clip_of_the_temporal_patch_and_other_clips_must_fit_it():
  from sora_jax import UsageError, sample
  from sora_jax.models import autoencoder
  rng = np.random.default_rng(0)
  image, clip = rng.normal(size=(1, 8, 12, 3)), rng.normal(size=(4, 8, 8, 3))
  assert packing.tokens_of((1, 8, 12), PATCH) == 6 and packing.tokens_of((4, 8, 8), PATCH) == 8
  row = packing.pack([image, clip], PATCH, 16)
  assert row['grids'] == [(1, 2, 3), (2, 2, 2)]
  np.testing.assert_allclose(row['x_sp'][:6], dit.patchify(np.repeat(image, 2, axis=0)[None], PATCH)[0])
  assert (row['pos_s3'][:6, 0] == 0).all() and (row['segment_s'] == [1] * 6 + [2] * 8 + [0] * 2).all()
  config = _native_config()
  config.model.patch = PATCH
  assert sample.check_size(config, autoencoder.Identity(), 1, 8, 12) == (1, 8, 12)
  with pytest.raises(UsageError, match=r'does not divide frames=3'):
    sample.check_size(config, autoencoder.Identity(), 3, 8, 12, names=('frames', 'height', 'width'))


def test_each_packed_token_is_given_the_frames_of_its_clips_mask():
  from sora_jax.diffusion import frame_conditioning as fc
  rng = np.random.default_rng(0)
  clips = [rng.normal(size=(4, 8, 8, 3)), rng.normal(size=(1, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3))]
  row = packing.pack(clips, PATCH, 24, align=4)
  masks_nt = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool)  # the image: never given
  got = np.asarray(fc.packed_token_mask(jnp.asarray(masks_nt[None]), jnp.asarray(row['segment_s'][None]),
                                        jnp.asarray(row['pos_s3'][None]), PATCH[0]))[0]
  start = 0
  for i, grid in enumerate(row['grids']):
    tokens = int(np.prod(grid))
    expected = np.repeat(masks_nt[i, :grid[0] * PATCH[0]].reshape(grid[0], PATCH[0]), tokens // grid[0], axis=0)
    np.testing.assert_array_equal(got[start:start + tokens], expected)
    start = packing.aligned(start + tokens, 4)
  assert not got[row['segment_s'] == 0].any()  # padding


def _native_config():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  return shapes_native.get_config('tiny')


def test_aligned_packing_starts_every_sample_at_a_block_and_round_trips():
  rng = np.random.default_rng(4)
  a, b, c = rng.normal(size=(4, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3)), rng.normal(size=(2, 8, 4, 3))
  row = packing.pack([a, b, c], PATCH, length=32, align=8)  # 12, 2 and 2 tokens at 0, 16 and 24
  np.testing.assert_array_equal(row['segment_s'], [1] * 12 + [0] * 4 + [2] * 2 + [0] * 6 + [3] * 2 + [0] * 6)
  for x, y in zip(packing.unpack(row['x_sp'], row['grids'], PATCH, 3, align=8), (a, b, c)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  with pytest.raises(ValueError, match='need 26 tokens, more than the row length 25'):
    packing.pack([a, b, c], PATCH, length=25, align=8)
  counts = rng.choice([2, 12, 16, 30], size=200)
  rows = packing.plan_rows(counts, length=64, max_segments=8, align=8)
  assert sorted(i for r in rows for i in r) == list(range(200))
  for r in rows:  # every planned row packs
    packing.pack([np.zeros((2, 4, 4 * n, 3)) for n in counts[r]], PATCH, length=64, align=8)


def test_the_row_plan_places_every_sample_once_within_limits_and_wastes_under_5_percent():
  rng = np.random.default_rng(0)
  # Native shapes-like mix: 1, 8 or 16 frames of 32x32, 32x56 or 56x32 at 8x8 patches (one frame each).
  per_frame = rng.choice([16, 28, 28], size=2000)
  counts = per_frame * rng.choice([1, 8, 16], size=2000)
  rows = packing.plan_rows(counts, length=1024, max_segments=16)  # rows >= 2x the largest sample (448)
  assert sorted(i for row in rows for i in row) == list(range(2000))
  assert all(sum(counts[i] for i in row) <= 1024 and len(row) <= 16 for row in rows)
  efficiency = counts.sum() / (1024 * len(rows))
  assert efficiency >= 0.95, efficiency  # 0.994 here
  assert rows == packing.plan_rows(counts, length=1024, max_segments=16)  # deterministic
  with pytest.raises(ValueError, match='sample 1 has 600 tokens, more than the row length 512'):
    packing.plan_rows([10, 600], length=512, max_segments=4)


def test_rows_as_long_as_the_largest_clip_with_3_slots_waste_under_5_percent_from_a_wide_window():
  # configs/shapes_native.py: 16 to 224 tokens a clip (2 x 8 x 8 patches), at multiples of 16, in rows of 224.
  counts = np.asarray([16, 64, 112, 112, 128, 224, 224])[np.random.default_rng(0).integers(7, size=4000)]
  efficiency = lambda rows: counts.sum() / (224 * len(rows))  # noqa: E731
  wide = packing.plan_rows(counts, length=224, max_segments=3, open_rows=64, align=16)
  assert sorted(i for row in wide for i in row) == list(range(4000))
  assert all(len(row) <= 3 and sum(packing.aligned(counts[i], 16) for i in row) <= 224 for row in wide)
  assert efficiency(wide) >= 0.95, efficiency(wide)  # 0.97 here
  assert efficiency(packing.plan_rows(counts, length=224, max_segments=3, open_rows=16, align=16)) < efficiency(wide)


def test_packed_rows_stream_every_example_once_per_epoch_deterministically(tmp_path):
  from sora_jax.data import pipeline, shapes
  builder = shapes.build(str(tmp_path), sizes='2x8x8,4x8x16,2x16x8', num_train=40, num_validation=4, object_size=6)
  import tensorflow_datasets as tfds
  source = pipeline.SkipBadRecords(tfds.data_source(f'shapes/{builder.builder_config.name}', split='train',
                                                    data_dir=str(tmp_path)), max_text_len=32)
  counts = [packing.tokens_of(source[i]['video'].shape[:3], PATCH) for i in range(len(source))]
  rows = packing.PackedRows(source, counts, patch=PATCH, length=16, max_segments=6, seed=0)
  epoch = rows.epoch(0)
  assert sorted(i for row in epoch for i in row) == list(range(40))
  n = len(epoch)
  assert rows.row_examples(n) == rows.epoch(1)[0] and rows.epoch(1) != epoch  # reshuffled each epoch
  again = packing.PackedRows(source, counts, patch=PATCH, length=16, max_segments=6, seed=0)
  r = again[n + 1]  # random access, straight into epoch 1
  np.testing.assert_array_equal(r['x_sp'], rows[n + 1]['x_sp'])
  used = r['frames_n'] > 0
  assert r['segment_s'].max() == used.sum() and (r['token_mask'][~used] == False).all()  # noqa: E712
  first = source[rows.row_examples(n + 1)[0]]
  np.testing.assert_array_equal(r['tokens'][0], first['tokens'])
  back = packing.unpack(r['x_sp'], [tuple(g // p for g, p in zip(first['video'].shape[:3], PATCH))], PATCH, 3)[0]
  np.testing.assert_allclose(back, first['video'] / 127.5 - 1.0, atol=1e-6)
  assert sum(counts) / (16 * n) > 0.8


def test_a_curriculum_packs_only_its_sizes_for_its_first_rows_then_every_size(tmp_path):
  from sora_jax.data import pipeline, shapes
  builder = shapes.build(str(tmp_path), sizes='2x8x8,4x8x16,2x16x8', num_train=40, num_validation=4, object_size=6)
  import tensorflow_datasets as tfds
  source = pipeline.SkipBadRecords(tfds.data_source(f'shapes/{builder.builder_config.name}', split='train',
                                                    data_dir=str(tmp_path)), max_text_len=32)
  sizes = pipeline.clip_sizes(source)
  counts = [packing.tokens_of(size, PATCH) for size in sizes]
  kw = dict(patch=PATCH, length=16, max_segments=6, seed=0)
  small = [i for i, size in enumerate(sizes) if size == (2, 8, 8)]
  stream = packing.Curriculum(packing.PackedRows(source, counts, examples=small, **kw), 30,
                              packing.PackedRows(source, counts, **kw))
  first = [stream.row_examples(r) for r in range(30)]  # 30 rows: several epochs of the small clips
  assert {i for row in first for i in row} == set(small)
  assert stream.row_examples(30) == packing.PackedRows(source, counts, **kw).row_examples(0)
  assert stream.step_tokens(0, 2) == sum(counts[i] for row in first[:2] for i in row)
  assert (stream[3]['frames_n'][stream[3]['frames_n'] > 0] == 2).all()


def test_a_curriculum_must_name_some_of_the_data_sizes():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import UsageError, train
  config = shapes_native.get_config('tiny')
  config.packing.update(curriculum_steps=2, curriculum_sizes='2x16x16')
  train.validate_config(config, 1)
  config.packing.curriculum_sizes = '2x32x32'
  with pytest.raises(UsageError, match=r'config.packing.curriculum_sizes=.2x32x32.: give some of config.data.sizes'):
    train.validate_config(config, 1)
  config.packing.curriculum_sizes = ''
  with pytest.raises(UsageError, match='config.packing.curriculum_sizes'):
    train.validate_config(config, 1)
  config.packing.curriculum_sizes = '2x16x16'  # 4 tokens a clip, rows of 16: 4 clips
  assert train.curriculum_config(config).packing.row_length == 16 and config.packing.row_length == 32
  for bad in (2, 6):  # under one clip; not a multiple of config.packing.block = 4
    config.packing.curriculum_row_length = bad
    with pytest.raises(UsageError, match=f'config.packing.curriculum_row_length={bad}: must hold the largest'):
      train.validate_config(config, 1)
  config.packing.curriculum_row_length = None  # the rows of every step
  assert train.curriculum_config(config).packing.row_length == 32


def test_the_curriculum_steps_give_frames_at_their_own_probability():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import UsageError, train
  config = shapes_native.get_config('tiny')
  config.frame_conditioning.probability = 0.0
  config.packing.update(curriculum_steps=2, curriculum_sizes='2x16x16', curriculum_frame_conditioning=0.7)
  train.validate_config(config, 1)
  first = train.curriculum_config(config)  # what the first steps' train step is built from
  assert first.frame_conditioning.probability == 0.7 and train.frame_conditioning_on(first)
  assert config.frame_conditioning.probability == 0.0 and not train.frame_conditioning_on(config)
  config.packing.curriculum_frame_conditioning = None  # unset: the config's probability throughout
  assert train.curriculum_config(config).frame_conditioning.probability == 0.0
  config.packing.curriculum_frame_conditioning = 1.5
  with pytest.raises(UsageError, match=r'config.packing.curriculum_frame_conditioning=1.5: must be in \[0, 1\]'):
    train.validate_config(config, 1)
  config.packing.curriculum_frame_conditioning = 0.5
  config.model.frame_conditioning = False
  with pytest.raises(UsageError, match='config.packing.curriculum_frame_conditioning=0.5 needs a model'):
    train.validate_config(config, 1)


def test_a_curriculum_of_one_clip_size_is_fixed_size_batches_of_as_many_clips_as_its_rows_hold():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import train
  native = shapes_native.get_config()  # 9 rows of 192 tokens, 3 clips of 8x32x32 (64 tokens) each
  fixed = train.fixed_size_curriculum(native)
  assert fixed.batch_size == 27 and (fixed.data.frames, fixed.data.height, fixed.data.width) == (8, 32, 32)
  assert not train.packing_on(fixed) and set(train.batch_ndims(fixed)) == {'video', 'tokens', 'token_mask'}
  assert fixed.frame_conditioning.probability == 0.6 and native.frame_conditioning.probability == 0.2
  assert fixed.model.to_dict() == native.model.to_dict() and fixed.optim.to_dict() == native.optim.to_dict()
  config = shapes_native.get_config('tiny')  # 8 rows of 16 tokens, clips of 4 tokens, up to 8 a row
  config.packing.update(curriculum_steps=2, curriculum_sizes='2x16x16')
  assert train.fixed_size_curriculum(config).batch_size == 32
  config.packing.max_segments = 3
  assert train.fixed_size_curriculum(config).batch_size == 24
  config.packing.curriculum_sizes = '2x16x16,2x16x24'  # several sizes: packed rows
  assert train.fixed_size_curriculum(config) is None
  config.packing.curriculum_sizes = '1x16x16'  # stills: packed rows (as still clips of 2 frames)
  assert train.fixed_size_curriculum(config) is None
  config.packing.update(curriculum_sizes='2x16x16', loss_weighting='token', curriculum_frame_conditioning=0.5)
  assert train.fixed_size_curriculum(config) is None  # a clip given frames counts by its generated values
  config.packing.curriculum_frame_conditioning = 0.0  # no given frames: every clip the same size and weight
  assert train.fixed_size_curriculum(config).batch_size == 24
  config.packing.curriculum_steps = 0
  assert train.fixed_size_curriculum(config) is None


@pytest.mark.slow
def test_a_run_with_a_fixed_size_curriculum_resumes_on_either_side_of_its_end_to_the_same_result(tmp_path, monkeypatch,
                                                                                               caplog):
  import logging
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import train
  from tests.test_train import assert_same_state, read_metrics, train_rows
  config = shapes_native.get_config('tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.update(total_steps=4, log_every_steps=1, checkpoint_every_steps=4)
  config.packing.update(curriculum_steps=2, curriculum_sizes='2x16x16')
  config.frame_conditioning.probability = 0.6
  config.sample.prompts = ()
  full = str(tmp_path / 'full')
  with caplog.at_level(logging.INFO):
    state_full = train.train_and_evaluate(config, full)
  assert 'curriculum: steps 0..2 train fixed-size batches of 32 clips of 2x16x16' in caplog.text
  rows = read_metrics(full)
  # Step 2 (step 1 has no rate: the compile): 32 clips of 4 tokens; steps 3-4: 8 packed rows of 32 tokens,
  # every size, some padding.
  tokens_per_step = [r['perf/tokens_per_sec'] / r['perf/steps_per_sec'] for r in rows if 'perf/tokens_per_sec' in r]
  assert tokens_per_step[0] == pytest.approx(128) and all(128 < t < 8 * 32 for t in tokens_per_step[1:])
  workdir = str(tmp_path / 'preempted')
  with monkeypatch.context() as m:  # stopped in the curriculum (step 1), then after it (step 3)
    m.setattr(train.StopSignal, 'should_stop', lambda self, step: step in (1, 3))
    assert int(train.train_and_evaluate(config, workdir)['step']) == 1
    assert int(train.train_and_evaluate(config, workdir)['step']) == 3
  resumed = train.train_and_evaluate(config, workdir)
  assert train_rows(workdir) == train_rows(full)
  assert_same_state(resumed, state_full)


@pytest.mark.slow
def test_the_native_config_trains_packed_rows_and_samples_each_size(data_dir, tmp_path):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import UsageError, sample, train
  config = shapes_native.get_config('tiny')
  config.data.data_dir = str(tmp_path / 'tfds')
  config.update(total_steps=3, log_every_steps=1)
  config.frame_conditioning.probability = 0.6  # frame-conditioned packed rows
  config.sample.prompts = ()
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)
  import json
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows] == [1, 2, 3] and all(np.isfinite(r['train/loss']) for r in rows)
  model = sample.load(workdir)
  # Sampling reads the EMA parameters, or the raw ones on request (without the optimizer state).
  raw = sample.load(workdir, params='raw')
  for loaded, trained in ((model.params, state['ema']), (raw.params, state['params'])):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, trained)
  assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), raw.params, model.params)))
  with pytest.raises(UsageError, match="params='best'"):
    sample.load(workdir, params='best')
  for size in ((1, 16, 16), (2, 16, 24), (2, 24, 16)):  # an image, wide and tall clips
    assert sample.generate(model, ['a red circle moving right'], size=size, num_steps=1).shape == (1, *size, 3)
  first = np.random.default_rng(0).integers(0, 256, (4, 16, 24, 3), np.uint8)  # image-to-video, wide
  out = sample.generate(model, ['a red circle moving right'], size=(4, 16, 24), num_steps=2, given=first,
                        given_mask=np.array([True, False, False, False]))
  np.testing.assert_array_equal(out[0, 0], first[0])
  # An edit keeps a native-size clip's own size (one window of its length) where the model makes it.
  from sora_jax import prompting
  assert sample.edit_size(model.config, model.autoencoder, first[:2]) == ((2, 16, 24), None)
  assert sample.edit_size(model.config, model.autoencoder, first, frames=2, width=16) == ((2, 16, 16), None)
  (thw, note) = sample.edit_size(model.config, model.autoencoder, first[:, :, :20])  # 20: no whole patches
  assert thw == (2, 16, 16) and "not at the clip's own size" in note and 'does not divide' in note
  with pytest.raises(UsageError, match=r'2x512x512 is \d+ spacetime patches'):
    sample.edit_size(model.config, model.autoencoder, first, height=512, width=512)
  edited, note = prompting.edit(model, ['a blue circle moving right'], first[:2], num_steps=1)
  assert edited.shape == (1, 2, 16, 24, 3) and note is None
  import subprocess
  from tests.conftest import subprocess_env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, 'experiments/eval_shapes.py', f'--workdir={workdir}', '--size=1x16x16',
                           '--steps=1', '--batch=21'], cwd=root, env=subprocess_env(1, PYTHONPATH=root),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  line = json.loads(result.stdout.splitlines()[-1])  # images: 21 captions, color and shape only
  assert line['n'] == 21 and line['exact_size'] and 'direction' not in line and 0 <= line['color'] <= 1
  assert '21/21 videos | ' in result.stderr and ', ETA 0:00:00' in result.stderr  # progress, on stderr
  # The second judge, a classifier trained for this size, reads rendered clips of it right.
  assert 0 <= line['learned_shape'] <= 1 and line['learned_judge_on_truth']['color'] >= 0.9
  config.frame_conditioning.noise_max = 0.1
  with pytest.raises(UsageError, match='packed training does not support config.frame_conditioning.noise_max'):
    train.validate_config(config, 1)


def test_in_a_packed_step_padding_costs_nothing():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import optim, train
  config = shapes_native.get_config('tiny')
  graphdef, params = random_dit()
  config.model.update(width=32, depth=2, num_heads=4, text_width=16, text_depth=1, text_heads=2, patch=PATCH)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  step = jax.jit(train.make_train_step(config, graphdef, tx, autoencoder=None))
  rng = np.random.default_rng(0)
  row = packing.pack([rng.normal(size=(4, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3))], PATCH, 16, 8)
  tokens, mask = byte.tokenize(['a red circle moving right', 'a blue square'] + [''] * 6, 32)
  mask[2:] = False
  batch = dict(x_sp=row['x_sp'][None], segment_s=row['segment_s'][None], pos_s3=row['pos_s3'][None],
               tokens=tokens[None], token_mask=mask[None], frames_n=np.array([[4, 2] + [0] * 6]))
  state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema=params)
  noisy = dict(batch, x_sp=batch['x_sp'].copy())
  noisy['x_sp'][0, 14:] = 1e3  # the padding tokens' values
  a, metrics_a = step(state, batch, {})
  b, metrics_b = step(state, noisy, {})
  np.testing.assert_allclose(metrics_a['train/loss'], metrics_b['train/loss'], rtol=1e-6)
  np.testing.assert_allclose(metrics_a['train/grad_norm'], metrics_b['train/grad_norm'], rtol=1e-5)


def test_a_native_model_makes_an_image_or_a_short_clip_in_one_pass():
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes, shapes_native
  from sora_jax import prompting
  native, fixed = shapes_native.get_config(), shapes.get_config()
  assert native.model.patch[0] == 2
  # Rounded up to whole temporal patches (then cut): 3 frames are one pass of 4, 15 one pass of 16.
  assert [prompting.window_length(native, f) for f in (1, 3, 8, 12, 13, 15, 40)] == [1, 4, 8, 12, 14, 16, 16]
  assert [prompting.window_length(fixed, f) for f in (1, 8, 40)] == [8, 8, 8]  # windows of T, then cut
  assert prompting.check_loop(native, 5) == 4  # a loop's bridge lies inside the output: rounded down


def test_a_native_model_edits_a_clip_at_its_own_length_through_whole_patches(monkeypatch):
  import os
  import sys
  import types
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes_native
  from sora_jax import prompting, sample
  passes = []

  def generate(model, prompts, *, edit, size, **kw):  # the clip back: only lengths matter here
    passes.append(size)
    return np.repeat(edit[None], len(prompts), axis=0)
  monkeypatch.setattr(sample, 'generate', generate)
  model = types.SimpleNamespace(config=shapes_native.get_config())
  clip = np.random.default_rng(0).integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
  out, note = prompting.edit(model, ['a blue circle moving right'], clip)  # one pass of 14, cut to 13
  assert passes[-1] == (14, 32, 32) and out.shape == (1, 13, 32, 32, 3) and note is None
  assert (out[0] == clip).all()
  out, note = prompting.edit(model, ['a blue circle moving right'], clip, frames=8)
  assert out.shape[1] == 8 and note == 'edit: the video has 13 frames; using 8 (its first ones)'
  out, note = prompting.edit(model, ['a blue circle moving right'], np.concatenate([clip, clip]))  # 26 > 16
  assert out.shape[1] == 16 and note == 'edit: the video has 26 frames; using 16 (its first ones)'
