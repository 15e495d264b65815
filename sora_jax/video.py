"""Writing and reading videos: mp4 (H.264 4:4:4 through PyAV, no system ffmpeg) and GIF."""

import math
import os

import av
import numpy as np
from PIL import Image

SUFFIXES = ('.mp4', '.gif', '.png')  # .png: one frame (an image)
GIF_FRAME_MS = 'sora_jax frame_ms='  # the comment of the GIFs `write` makes: one frame's duration


def to_uint8(video_thwc) -> np.ndarray:
  """Float video in [-1, 1] -> uint8 [T, H, W, 3]."""
  return np.clip(np.round((np.asarray(video_thwc, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def write(path: str, frames_thwc: np.ndarray, fps: int = 8, upscale: int = 1) -> str:
  """Writes uint8 frames [T, H, W, 3] to `path` (.mp4, .gif, or .png for one frame); `upscale` repeats pixels."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(f'{path}: unsupported video format {suffix!r}; use one of {SUFFIXES}')
  frames = np.asarray(frames_thwc, np.uint8)
  if upscale > 1:
    frames = frames.repeat(upscale, axis=1).repeat(upscale, axis=2)
  if suffix == '.png' and len(frames) != 1:
    raise ValueError(f'{path}: a .png holds one frame, got {len(frames)} (use .mp4 or .gif)')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if suffix == '.png':
    Image.fromarray(frames[0]).save(path)
    return path
  if suffix == '.gif':
    # Pillow merges identical consecutive frames into one longer frame; the comment lets `read` undo it.
    images, frame_ms = [Image.fromarray(f) for f in frames], int(1000 / fps)
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0,
                   comment=f'{GIF_FRAME_MS}{frame_ms}')
    return path
  # yuv444p keeps full colour resolution: 4:2:0 blurs small saturated shapes.
  with av.open(path, mode='w') as container:
    stream = container.add_stream('libx264', rate=fps)
    stream.height, stream.width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    stream.pix_fmt = 'yuv444p'
    stream.options = {'crf': '0'}
    for f in frames:
      f = np.pad(f, ((0, stream.height - f.shape[0]), (0, stream.width - f.shape[1]), (0, 0)))
      for packet in stream.encode(av.VideoFrame.from_ndarray(f, format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return path


def read(path: str) -> np.ndarray:
  """uint8 [T, H, W, 3] frames of an mp4, gif or png (a GIF of `write` gets back frames it merged)."""
  if os.path.splitext(path)[1].lower() in ('.gif', '.png'):
    with Image.open(path) as im:
      comment = im.info.get('comment', b'').decode('latin-1')
      frame_ms = int(comment[len(GIF_FRAME_MS):]) if comment.startswith(GIF_FRAME_MS) else None
      frames = []
      for i in range(getattr(im, 'n_frames', 1)):
        im.seek(i)
        # k merged frames keep k * frame_ms rounded down to the GIF's 10 ms units, so this is k exactly.
        repeat = max(1, math.ceil(im.info.get('duration', 0) / frame_ms)) if frame_ms else 1
        frames.extend([np.asarray(im.convert('RGB'))] * repeat)
    return np.stack(frames)
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])
