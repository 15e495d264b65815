"""The `folder` dataset: a user's clips, resampled in time, center-cropped, captioned, bad files counted."""

import fractions
import json
import os
import re
import shutil

import av
import ml_collections
import numpy as np
import pytest
from PIL import Image

from sora_jax import UsageError
from sora_jax.data import folder, pipeline

FRAMES, SIZE, FPS = 5, 32, 8  # 5 frames at 8 fps: the clip's first 0.5 s, every third frame of 24 fps
MARKERS = {'green': (0, 255, 0), 'blue': (0, 0, 255), 'cyan': (0, 255, 255), 'magenta': (255, 0, 255)}


def gray(i: int) -> int:
  """Background brightness of source frame i: tells which source frame an output frame came from."""
  return 8 + 12 * i


def write_clip(path, *, height: int, width: int, frames: int, marker=(0, 255, 0), fps: int = 24, rotation=None,
               corner=None, pixel_aspect=None):
  """An H.264 clip: frame i has background gray(i), a 16 x 16 `marker` square at the center and 4 px
  red bands at both ends of the long side, which a center crop to a square must cut off; `corner`, a
  12 x 12 block of that color near the top left, shows the orientation; `pixel_aspect` (a Fraction)
  marks the stored pixels as that many times wider than tall."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(str(path), 'w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.height, stream.width = height, width
    stream.pix_fmt, stream.options = 'yuv444p', {'crf': '0'}  # near lossless: gray levels survive
    if rotation is not None:
      stream.set_display_rotation(rotation)
    if pixel_aspect is not None:
      stream.codec_context.sample_aspect_ratio = pixel_aspect
    for i in range(frames):
      f = np.full((height, width, 3), gray(i), np.uint8)
      if width > height:
        f[:, :4] = f[:, -4:] = (255, 0, 0)
      elif height > width:
        f[:4] = f[-4:] = (255, 0, 0)
      f[height // 2 - 8:height // 2 + 8, width // 2 - 8:width // 2 + 8] = marker
      if corner is not None:
        f[:12, 8:20] = corner
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """4 usable clips (landscape and portrait, .mp4 .MOV .mkv, one in a subfolder), a corrupt file,
  a clip too short for 0.5 s, a hidden macOS `._` file; captions from captions.jsonl and a .txt."""
  root = tmp_path_factory.mktemp('clips')
  write_clip(root / 'wide.mp4', height=48, width=64, frames=18, marker=MARKERS['green'])
  write_clip(root / 'sub' / 'tall.MOV', height=64, width=48, frames=16, marker=MARKERS['blue'])
  write_clip(root / 'txt_clip.mp4', height=48, width=64, frames=14, marker=MARKERS['cyan'])
  write_clip(root / 'sub' / 'nocap.mkv', height=64, width=48, frames=20, marker=MARKERS['magenta'])
  write_clip(root / 'short.mp4', height=48, width=64, frames=6)  # 0.21 s
  (root / 'broken.mp4').write_bytes(np.random.default_rng(0).bytes(4096))
  (root / '._wide.mp4').write_bytes(b'\0\5\26\7 macOS resource fork')
  (root / 'notes.md').write_text('not a clip')
  with open(root / 'captions.jsonl', 'w') as f:
    for file, caption in [('wide.mp4', 'a green square'), ('sub/tall.MOV', 'a blue square'),
                          ('gone.mp4', 'a clip that was deleted')]:
      f.write(json.dumps({'file': file, 'caption': caption}) + '\n')
  (root / 'wide.txt').write_text('loses to captions.jsonl')
  (root / 'txt_clip.txt').write_text('a cyan square\n')
  return str(root)


@pytest.fixture(scope='module')
def built(clips, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return folder.build(clips, data_dir, frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)


def records(builder) -> list[dict]:
  sources = [builder.as_data_source(split) for split in builder.info.splits]
  return [source[i] for source in sources for i in range(len(source))]


def marker_of(video) -> str:
  """The name of the marker color at the center of the first frame."""
  center = video[0, SIZE // 2, SIZE // 2].astype(int)
  return min(MARKERS, key=lambda name: np.abs(center - MARKERS[name]).sum())


def test_readable_clips_become_records_and_skipped_files_are_counted_and_saved(built):
  stats = built.info.metadata
  assert stats['clips_found'] == 6  # not the hidden ._ file, not notes.md
  assert stats['read_ok'] == 4
  assert stats['skipped_unreadable'] == 1 and list(stats['unreadable_files']) == ['broken.mp4']
  assert stats['skipped_too_short'] == 1 and stats['too_short_files'] == ['short.mp4']
  assert stats['no_caption'] == 1 and stats['no_caption_files'] == ['sub/nocap.mkv']
  splits = {name: split.num_examples for name, split in built.info.splits.items()}
  assert sum(splits.values()) == 4 and splits['train'] >= 1 and splits['validation'] >= 1
  with open(os.path.join(built.data_dir, 'metadata.json')) as f:
    assert json.load(f)['skipped_unreadable'] == 1  # the user can read the counts next to the data


def test_videos_have_exactly_the_requested_shape_and_dtype(built):
  for r in records(built):
    assert r['video'].shape == (FRAMES, SIZE, SIZE, 3) and r['video'].dtype == np.uint8


def test_resampling_24_fps_to_8_fps_takes_every_third_source_frame(built):
  for r in records(built):
    background = r['video'][:, 26:30, 13:19].astype(float).mean(axis=(1, 2, 3))  # below the marker
    np.testing.assert_allclose(background, [gray(3 * i) for i in range(FRAMES)], atol=4)


def test_captions_come_from_the_jsonl_then_the_txt_and_are_empty_otherwise(built):
  captions = {marker_of(r['video']): r['caption'].decode() for r in records(built)}
  assert captions == {'green': 'a green square', 'blue': 'a blue square', 'cyan': 'a cyan square', 'magenta': ''}


def test_center_crop_keeps_the_center_and_does_not_distort(built):
  for r in records(built):
    frame = r['video'][0].astype(int)
    red = (frame[..., 0] - np.maximum(frame[..., 1], frame[..., 2])) > 60
    assert not red.any(), 'the bands at the ends of the long side must be cropped off'
    ys, xs = np.nonzero(np.maximum(frame[..., 1], frame[..., 2]) > 128)  # the marker (background ~8)
    height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert abs(height - width) <= 1 and 9 <= height <= 12  # 16 px scaled by 32/48, still square
    assert abs(ys.mean() - 15.5) <= 0.6 and abs(xs.mean() - 15.5) <= 0.6


def test_fit_scales_the_short_side_and_keeps_shapes_for_any_target_and_pixel_aspect():
  image = np.zeros((60, 90, 3), np.uint8)
  image[20:40, 35:55] = 255  # a 20 px square at the center
  for (h, w), expect in [((30, 30), 10), ((20, 40), 40 / 90 * 20), ((40, 20), 40 / 60 * 20)]:
    out = folder.fit(Image.fromarray(image), h, w)
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert abs(np.ptp(ys) + 1 - expect) <= 1 and abs(np.ptp(xs) + 1 - expect) <= 1
    assert abs(ys.mean() - (h - 1) / 2) <= 0.5 and abs(xs.mean() - (w - 1) / 2) <= 0.5
  # Anamorphic storage: pixels twice as wide as tall, so a 10 x 20 (w x h) block shows as a square.
  stored = np.zeros((40, 20, 3), np.uint8)
  stored[10:30, 5:15] = 255
  out = folder.fit(Image.fromarray(stored), 40, 40, pixel_aspect=2.0)
  ys, xs = np.nonzero(out[..., 0] > 127)
  assert np.ptp(ys) + 1 == np.ptp(xs) + 1 == 20


def test_pick_frames_takes_the_nearest_timestamp_and_rejects_a_short_video():
  def timed(n, rate, start=0.0):
    return ((start + i / rate, i) for i in range(n))
  assert folder.pick_frames(timed(20, 30), 5, 8) == [0, 4, 7, 11, 15]  # 3.75, 7.5 (tie: earlier), 11.25
  assert folder.pick_frames(timed(20, 30, start=1.5), 5, 8) == [0, 4, 7, 11, 15]  # from the first frame
  assert folder.pick_frames(timed(3, 4), 5, 8) == [0, 0, 1, 1, 2]  # upsampling repeats frames
  assert folder.pick_frames(timed(12, 24), 5, 8) is None  # needs 0.5 s, ends at 0.458 s
  assert folder.pick_frames(timed(12, 22.5), 5, 8) == [0, 3, 6, 8, 11]  # 0.5 s is within half a frame of 11


def test_rotation_metadata_is_applied_as_a_player_would(tmp_path):
  path = tmp_path / 'phone' / 'portrait.mp4'
  # Stored landscape with a blue block at the top left; rotated 90 degrees counterclockwise for display.
  write_clip(path, height=48, width=64, frames=4, rotation=90, corner=(0, 0, 255))
  video = folder.decode_clip(str(path), frames=2, height=32, width=24, fps=8)
  assert video.shape == (2, 32, 24, 3)  # portrait, scaled by 1/2 with nothing to crop
  frame = video[0].astype(int)
  red = (frame[..., 0] - frame[..., 1]) > 60
  assert red[:2].all() and red[-2:].all() and not red[4:-4].any()  # the side bands are now top and bottom
  blue = (frame[..., 2] - frame[..., 0]) > 100
  assert blue[23:27, 1:5].all() and blue.sum() <= 40  # the top left went to the bottom left


def test_non_square_pixels_are_shown_at_their_display_width(tmp_path):
  path = tmp_path / 'anamorphic.mkv'
  write_clip(path, height=32, width=32, frames=4, pixel_aspect=fractions.Fraction(2))  # shown 64 x 32
  video = folder.decode_clip(str(path), frames=1, height=16, width=32, fps=8)
  ys, xs = np.nonzero(video[0, ..., 1] > 128)  # the 16 x 16 stored marker, 32 x 16 on screen
  assert np.ptp(ys) + 1 == 8 and np.ptp(xs) + 1 == 16


def test_a_second_build_reuses_the_dataset_and_a_changed_folder_builds_anew(clips, built, tmp_path, monkeypatch):
  with monkeypatch.context() as m:
    m.setattr(folder, 'read_frames', lambda *a, **k: pytest.fail('decoded again'))
    again = folder.build(clips, str(built.data_dir_root), frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)
  assert again.data_dir == built.data_dir
  copy = str(tmp_path / 'clips')
  shutil.copytree(clips, copy)
  with open(os.path.join(copy, 'sub', 'nocap.txt'), 'w') as f:
    f.write('a magenta square')
  changed = folder.build(copy, str(built.data_dir_root), frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)
  assert changed.builder_config.name != built.builder_config.name and changed.info.metadata['no_caption'] == 0
  assert os.path.isdir(built.data_dir)  # the old version stays, side by side


def data_config(**overrides):
  return ml_collections.ConfigDict(dict(name='folder', frames=FRAMES, height=SIZE, width=SIZE, max_text_len=24,
                                        **overrides))


def test_the_pipeline_reads_folder_records_with_no_class_label(clips, built, monkeypatch):
  config = data_config(folder=clips, data_dir=str(built.data_dir_root))  # no fps field: 8 by default
  monkeypatch.setattr(folder, 'read_frames', lambda *a, **k: pytest.fail('decoded again'))
  source = pipeline.data_source(config, 'train')
  assert len(source) == built.info.splits['train'].num_examples
  example = pipeline.to_example(source[0], max_text_len=24)
  assert example['video'].shape == (FRAMES, SIZE, SIZE, 3) and example['label'] == np.int32(-1)
  assert example['label'].dtype == np.int32 and example['tokens'].shape == (24,)
  batch = next(pipeline.make_iterator(source, global_batch_size=2, seed=0, max_text_len=24))
  assert batch['video'].shape == (2, FRAMES, SIZE, SIZE, 3) and (batch['label'] == -1).all()


def test_a_missing_folder_or_one_without_a_readable_clip_is_a_usage_error_naming_it(tmp_path):
  missing = str(tmp_path / 'no_such_clips')
  with pytest.raises(UsageError, match=re.escape(missing)):
    folder.build(missing, str(tmp_path / 'tfds'), frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)
  with pytest.raises(UsageError, match=re.escape(missing)):
    pipeline.data_source(data_config(folder=missing, data_dir=str(tmp_path / 'tfds')), 'train')
  bad = tmp_path / 'bad_clips'
  bad.mkdir()
  with pytest.raises(UsageError, match=re.escape(str(bad)) + '.*no video files'):
    folder.build(str(bad), str(tmp_path / 'tfds'), frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)
  (bad / 'broken.webm').write_bytes(b'not a video')
  write_clip(bad / 'short.avi', height=16, width=16, frames=3)
  with pytest.raises(UsageError, match=re.escape(str(bad)) + r'.*no readable clip.*1 unreadable, 1 shorter'):
    folder.build(str(bad), str(tmp_path / 'tfds'), frames=FRAMES, height=SIZE, width=SIZE, fps=FPS)


def test_splits_are_deterministic_stable_as_the_folder_grows_and_never_leave_validation_empty():
  names = [f'clip_{i:03d}.mp4' for i in range(400)]
  splits = folder.assign_splits(names, 0.05)
  assert 8 <= len(splits['validation']) <= 35 and sorted(splits['train'] + splits['validation']) == names
  assert folder.assign_splits(names, 0.05) == splits
  grown = folder.assign_splits(names + [f'new_{i}.mp4' for i in range(100)], 0.05)
  assert set(splits['validation']) <= set(grown['validation'])
  assert len(folder.assign_splits(names[:2], 0.05)['validation']) == 1
  assert folder.assign_splits(names[:1], 0.05) == {'train': names[:1], 'validation': []}
  assert folder.assign_splits(names[:5], 0.0)['validation'] == []


def test_captions_csv_is_read_jsonl_wins_over_it_and_a_malformed_jsonl_line_is_a_usage_error_naming_it(tmp_path):
  (tmp_path / 'captions.csv').write_text('\ufefffile,caption\n./a.mp4,"a cat, sleeping"\nsub\\b.webm,a dog\n',
                                         encoding='utf-8')
  assert folder.read_captions(str(tmp_path), ['a.mp4', 'sub/b.webm', 'c.avi']) == {
      'a.mp4': 'a cat, sleeping', 'sub/b.webm': 'a dog'}
  (tmp_path / 'captions.jsonl').write_text('{"file": "a.mp4", "caption": "jsonl wins"}\n')
  assert folder.read_captions(str(tmp_path), ['a.mp4', 'sub/b.webm'])['a.mp4'] == 'jsonl wins'
  (tmp_path / 'captions.jsonl').write_text('{"file": "a.mp4", "caption": "jsonl wins"}\n{"file": "c.avi"\n')
  with pytest.raises(UsageError, match=r'captions.jsonl:2'):
    folder.read_captions(str(tmp_path), ['a.mp4'])


def test_with_sizes_each_clip_keeps_its_framing_in_the_size_nearest_its_aspect_and_batches_in_buckets(clips, tmp_path):
  from sora_jax.data import buckets
  builder = folder.build(clips, str(tmp_path), frames=FRAMES, height=SIZE, width=SIZE, fps=FPS,
                         sizes='5x16x16,5x16x24,5x24x16,1x16x16')
  stats = builder.info.metadata
  # landscape 64x48 clips -> wide, portrait -> tall; the 0.21 s clip is too short for 5 frames: an image
  assert stats['clips_per_size'] == {'5x16x24': 2, '5x24x16': 2, '1x16x16': 1} and stats['skipped_too_short'] == 0
  assert 'at 5x16x24' in folder.summary(builder)
  videos = [r['video'] for r in records(builder)]
  assert sorted(v.shape for v in videos) == sorted([(5, 16, 24, 3)] * 2 + [(5, 24, 16, 3)] * 2 + [(1, 16, 16, 3)])
  for video in videos:  # the 16 x 16 marker square stays a square (6 x 6 after scaling): cropped, never stretched
    h, w = video.shape[1:3]
    center = video[0, h // 2, w // 2].astype(int)
    color = min(MARKERS.values(), key=lambda c: np.abs(center - c).sum())
    marker = np.abs(video[0].astype(int) - color).sum(-1) < 150
    rows, cols = marker[:, w // 2].sum(), marker[h // 2].sum()
    assert abs(int(rows) - int(cols)) <= 1, (video.shape, rows, cols)
  config = data_config(folder=clips, data_dir=str(tmp_path), sizes='5x16x16,5x16x24,5x24x16,1x16x16')
  source = pipeline.SkipBadRecords(pipeline.data_source(config, 'train'), max_text_len=24)
  sizes = pipeline.clip_sizes(source)
  stream = buckets.BucketedBatches(source, sizes, patch=(1, 8, 8), tokens_per_step=12, multiple=1, seed=0)
  for k in range(4):
    assert len({sizes[i] for i in stream.batch_examples(k)}) == 1 and stream[k]['video'].ndim == 5
