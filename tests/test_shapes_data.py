import numpy as np
import pytest

from sora_jax.data import pipeline, shapes
from sora_jax.eval import adherence


def test_clips_are_deterministic_and_match_their_caption(data_dir):
  a = shapes.build(data_dir, num_train=64, num_validation=8).as_data_source('train')
  b = shapes.build(data_dir, num_train=64, num_validation=8).as_data_source('train')
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i]['video'], b[i]['video'])
    color, shape, direction = shapes.parse_caption(a[i]['caption'].decode())
    assert shapes.COLOR_NAMES[a[i]['color']] == color
    assert shapes.DIRECTION_NAMES[a[i]['direction']] == direction
    assert shapes.SHAPES[a[i]['shape']] == shape


def test_every_clip_has_one_pure_color_stays_in_frame_and_moves_a_quarter_frame():
  rng = np.random.default_rng(0)
  for _ in range(50):
    clip = shapes.random_clip(rng, frames=8, height=32, width=40, object_size=10)
    v = clip['video']
    colors = {tuple(p) for p in v.reshape(-1, 3)}
    assert colors == {(0, 0, 0), shapes.COLORS[shapes.COLOR_NAMES[clip['color']]]}
    mask = adherence.bright_mask(v)
    # in frame: the same number of pixels in every frame (nothing clipped at a border)
    counts = mask.sum(axis=(1, 2))
    assert counts.min() > 0 and counts.min() == counts.max()
    first, last = np.argwhere(mask[0]).mean(0), np.argwhere(mask[-1]).mean(0)
    moved = np.abs(last - first).max()
    extent = 32 if shapes.DIRECTION_NAMES[clip['direction']] in ('up', 'down') else 40
    assert moved >= extent / 4 - 1


def test_the_analytic_judge_agrees_with_the_labels_of_real_clips():
  rng = np.random.default_rng(1)
  clips = [shapes.random_clip(rng, frames=8, height=32, width=32, object_size=12) for _ in range(60)]
  result = adherence.score([c['video'] for c in clips], [c['caption'] for c in clips])
  assert result['all'] == 1.0 and all(result[f'shape_{name}'] == 1.0 for name in shapes.SHAPES)
  # Captions that call every square a circle: only circles' score drops, by the squares' share.
  relabeled = [c['caption'].replace('square', 'circle') for c in clips]
  result = adherence.score([c['video'] for c in clips], relabeled)
  squares = sum('square' in c['caption'] for c in clips)
  circles = sum('circle' in c['caption'] for c in clips)
  assert 'shape_square' not in result and result['shape_triangle'] == 1.0
  assert result['shape_circle'] == pytest.approx(circles / (circles + squares))


def test_per_color_scores_show_which_colors_a_model_mixes_up():
  rng = np.random.default_rng(2)
  clips = [shapes.random_clip(rng, frames=8, height=32, width=32, object_size=12) for _ in range(80)]
  captions = [c['caption'] for c in clips]
  assert all(adherence.score([c['video'] for c in clips], captions)[f'color_{n}'] == 1.0 for n in shapes.COLOR_NAMES)
  # Captions with red and green swapped, as a model that mixes them up would be asked for:
  swap = {'red': 'green', 'green': 'red'}
  swapped = [' '.join(swap.get(w, w) for w in text.split()) for text in captions]
  result = adherence.score([c['video'] for c in clips], swapped)
  assert result['color_red'] == result['color_green'] == 0.0
  assert all(result[f'color_{n}'] == 1.0 for n in shapes.COLOR_NAMES if n not in swap)
  assert result['color'] == pytest.approx(1 - sum(shapes.COLOR_NAMES[c['color']] in swap for c in clips) / len(clips))


def source_of(data_dir):
  import ml_collections
  c = ml_collections.ConfigDict(dict(name='shapes', data_dir=data_dir, frames=8, height=32, width=32,
                                     object_size=12, num_train=64, num_validation=8, seed=0))
  return pipeline.data_source(c, 'train')


def test_the_batch_of_a_step_is_a_function_of_seed_and_step_only(data_dir):
  source = source_of(data_dir)
  it = pipeline.make_iterator(source, global_batch_size=4, seed=3, max_text_len=40)
  first = next(it)
  assert first['video'].shape == (4, 8, 32, 32, 3) and first['tokens'].shape == (4, 40)
  expected = [next(it)['video'] for _ in range(20)]  # steps 1..20: past the end of an epoch (16 steps)
  resumed = pipeline.make_iterator(source, global_batch_size=4, seed=3, max_text_len=40, start_step=5)
  for e in expected[4:]:
    np.testing.assert_array_equal(next(resumed)['video'], e)
  # every epoch is a fresh permutation of all 64 records
  epoch = [first['video']] + expected[:15]
  assert len({clip.tobytes() for batch in epoch for clip in batch}) == 64
  assert not all((a == b).all() for a, b in zip(epoch, expected[15:16]))


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_contiguous_shares_that_concatenate_to_the_one_process_batch(data_dir, process_count):
  source = source_of(data_dir)
  one = pipeline.make_iterator(source, global_batch_size=8, seed=3, max_text_len=40, start_step=6)
  shares = [pipeline.make_iterator(source, global_batch_size=8, seed=3, max_text_len=40, start_step=6,
                                   process_index=p, process_count=process_count) for p in range(process_count)]
  for _ in range(3):
    whole = next(one)
    parts = [next(it) for it in shares]
    assert parts[0]['video'].shape[0] == 8 // process_count
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), whole[key])


class BrokenSource:
  """A source whose records 3 and 7 fail to read and record 5 has a malformed video."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i in (3, 7):
      raise OSError(f'corrupt record {i}')
    record = dict(self.source[i])
    if i == 5:
      record['video'] = np.zeros((2, 2), np.float32)
    return record


def test_broken_records_are_replaced_by_the_next_readable_one_and_counted(data_dir):
  source = pipeline.SkipBadRecords(BrokenSource(source_of(data_dir)), max_text_len=40)
  it = pipeline.make_iterator(source, global_batch_size=16, seed=0, max_text_len=40)
  batches = [next(it) for _ in range(8)]  # two epochs
  assert all(b['video'].shape == (16, 8, 32, 32, 3) for b in batches)
  good = {source.source.source[i]['video'].tobytes() for i in range(64) if i not in (3, 5, 7)}
  seen = {v.tobytes() for b in batches for v in b['video']}
  assert seen == good
  assert source.skipped >= 2 * 3  # each broken record, once per epoch (prefetch may read ahead)
  np.testing.assert_array_equal(source[3]['video'], source[4]['video'])  # deterministic stand-in



class UndecodableSource:
  """64 records, none of which has a video."""

  def __len__(self):
    return 64

  def __getitem__(self, i):
    return {'caption': b'a red circle moving left'}


def test_a_dataset_with_no_usable_record_is_a_clear_error_not_a_hang():
  from sora_jax import UsageError
  it = pipeline.make_iterator(UndecodableSource(), global_batch_size=4, seed=0, max_text_len=40)
  with pytest.raises(UsageError, match=r'has no usable record: all 64 failed to read'):
    next(it)
  with pytest.raises(UsageError, match='has no records'):
    pipeline.make_iterator([], global_batch_size=4, seed=0, max_text_len=40)


def test_a_native_size_dataset_draws_each_clip_size_from_its_list_and_images_name_no_motion(tmp_path):
  import tensorflow_datasets as tfds
  sizes = '1x32x32,8x32x56,8x56x32'
  builder = shapes.build(str(tmp_path), sizes=sizes, num_train=24, num_validation=4)
  assert builder.builder_config.name.startswith('native_1x32x32-8x32x56-8x56x32_')
  records = tfds.data_source(builder.name + '/' + builder.builder_config.name, data_dir=str(tmp_path))['train']
  seen = set()
  for i in range(len(records)):
    r = records[i]
    size = r['video'].shape[:3]
    seen.add(size)
    parsed = shapes.parse_caption(r['caption'].decode() if isinstance(r['caption'], bytes) else r['caption'])
    assert parsed is not None and (parsed[2] is None) == (size[0] == 1)  # images: 'a red circle'
    assert adherence.judge_color(r['video']) == parsed[0]
  assert seen == {(1, 32, 32), (8, 32, 56), (8, 56, 32)}
  assert shapes.make_config().name == 'f8_h32_w32_o12_n8192_v512_s0'  # fixed-size names unchanged
  with pytest.raises(Exception, match='give FRAMESxHEIGHTxWIDTH items'):
    shapes.make_config(sizes='8x32')
  with pytest.raises(Exception, match='does not fit in a 8x32 frame'):
    shapes.make_config(sizes='8x8x32', object_size=12)


def test_a_dataset_larger_than_tfds_memory_buffer_builds_without_tensorflow(tmp_path, monkeypatch):
  # TFDS spills examples past its in-memory limit (1 GB) to bucket files through tf.io.gfile; here the
  # limit is 1 KB, so every build spills: the records must come out as in an in-memory build.
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import shuffle
  from sora_jax.data import shapes
  kw = dict(frames=2, height=16, width=16, object_size=6, num_train=24, num_validation=4)
  memory = shapes.build(str(tmp_path / 'memory'), **kw)
  monkeypatch.setattr(shuffle, 'MAX_MEM_BUFFER_SIZE', 1000)
  spilled = shapes.build(str(tmp_path / 'spilled'), **kw)
  read = lambda b, d: tfds.data_source(f'shapes/{b.builder_config.name}', split='train', data_dir=str(tmp_path / d))
  a, b = read(memory, 'memory'), read(spilled, 'spilled')
  assert len(a) == len(b) == 24
  for x, y in zip(a, b):  # the same records in the same (key-hashed) order
    assert x['caption'] == y['caption']
    np.testing.assert_array_equal(x['video'], y['video'])


def test_a_dataset_another_run_built_meanwhile_is_read_not_an_error(tmp_path, monkeypatch):
  # Two runs started together both build it; TFDS renames each build into place at its end, and the
  # later rename fails because the earlier one is there.
  from sora_jax import data  # pylint: disable=g-import-not-at-top
  config = shapes.make_config(num_train=12, num_validation=4, object_size=6, height=16, width=16, frames=2)
  build = shapes.Shapes.download_and_prepare
  def race(self, **kwargs):
    build(shapes.Shapes(config=config, data_dir=str(tmp_path)), **kwargs)  # the other run, first
    raise OSError(f'Cannot rename {self.data_dir}.incomplete: destination already exists')
  monkeypatch.setattr(shapes.Shapes, 'download_and_prepare', race)
  builder = data.prepare(lambda: shapes.Shapes(config=config, data_dir=str(tmp_path)))
  assert len(builder.as_data_source('train')) == 12


def test_a_failed_build_with_nothing_built_still_fails(tmp_path, monkeypatch):
  from sora_jax import data  # pylint: disable=g-import-not-at-top
  def fail(self, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(shapes.Shapes, 'download_and_prepare', fail)
  with pytest.raises(OSError, match='disk full'):
    data.prepare(lambda: shapes.Shapes(config=shapes.make_config(num_train=12, num_validation=4, object_size=6,
                                                                 height=16, width=16, frames=2),
                                       data_dir=str(tmp_path)))
