import numpy as np
import pytest
from PIL import Image

from sora_jax import video


def clip_with_still_frames():
  frames = np.zeros((9, 8, 12, 3), np.uint8)
  frames[1:4] = 90  # frames 1-3 identical, then 4-8 identical: Pillow stores 3 GIF frames
  frames[4:] = 200
  frames[:, 2, 3] = (255, 0, 0)
  return frames


@pytest.mark.parametrize('suffix,fps,still', [('.gif', 8, 5), ('.gif', 30, 60), ('.gif', 7, 33), ('.mp4', 8, 5)])
def test_a_written_video_reads_back_frame_for_frame_even_where_frames_repeat(tmp_path, suffix, fps, still):
  frames = clip_with_still_frames()
  frames = np.concatenate([frames, np.repeat(frames[-1:], still - 5, axis=0)])  # frames 4.. the same
  path = video.write(str(tmp_path / f'clip{suffix}'), frames, fps=fps)
  back = video.read(path)
  assert back.shape == frames.shape
  # A GIF's palette holds these few colors exactly; mp4 (crf 0, yuv444p) rounds through YUV by a level.
  np.testing.assert_allclose(back, frames, atol=0 if suffix == '.gif' else 2)


def test_a_gif_from_elsewhere_reads_as_stored(tmp_path):
  frames = clip_with_still_frames()
  images = [Image.fromarray(f) for f in frames]
  images[0].save(tmp_path / 'other.gif', save_all=True, append_images=images[1:], duration=100, loop=0)
  assert len(video.read(str(tmp_path / 'other.gif'))) == 3  # no comment of ours: its frames as they are
