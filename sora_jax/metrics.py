"""Metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard events, console progress.

Only process 0 writes. `metrics.jsonl` loads in a notebook with `pandas.read_json(path, lines=True)`.
"""

import io
import json
import os
import sys
import time

import numpy as np
from absl import logging
from PIL import Image


def _import_tensorboardx():
  """tensorboardX, imported without torch: it imports torch when installed (1.3 s of every command's
  start) only to accept torch tensors, and we hand it numpy."""
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None  # `import torch` raises ImportError: tensorboardX's fallback
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


summary_pb2 = _import_tensorboardx().proto.summary_pb2


class Writer:
  """Appends to a workdir's metrics; on resume at `resume_step`, first drops what was logged after it.

  Steps after the last checkpoint are trained again on resume, so their old rows (and TensorBoard
  events) are superseded: without the cut a notebook would see them twice.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      truncate_jsonl(path, resume_step)
      self._jsonl = open(path, 'a')
      self._tb = _import_tensorboardx().SummaryWriter(workdir, purge_step=resume_step + 1)  # no TensorFlow

  def scalars(self, step: int, scalars: dict):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))

  def videos(self, step: int, videos: dict, fps: int = 8):
    """videos: name -> uint8 [T, H, W, 3]; shown in TensorBoard's image tab as animated GIFs.

    Encoded here: tensorboardX's add_video needs moviepy.
    """
    if not self.enabled:
      return
    for name, v in videos.items():
      v = np.asarray(v, np.uint8)
      buffer = io.BytesIO()
      frames = [Image.fromarray(f) for f in v]
      frames[0].save(buffer, format='GIF', save_all=True, append_images=frames[1:],
                     duration=int(1000 / fps), loop=0)
      image = summary_pb2.Summary.Image(height=v.shape[1], width=v.shape[2], colorspace=3,
                                        encoded_image_string=buffer.getvalue())
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, image=image)])
      self._tb.file_writer.add_summary(summary, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def truncate_jsonl(path: str, last_step: int) -> None:
  """Keeps the rows of `path` with step <= last_step (atomically: a crash keeps the old file)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line.rstrip('\n') + '\n' for line in lines if line.strip() and _row_step(line) <= last_step]
  if kept == lines:
    return
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)


def _row_step(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):  # a line cut short by a crash
    return float('inf')


class Progress:
  """Steps/s and ETA over the steps since the last report (compile time excluded after the first)."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self.last_step, self.last_time = start_step, None

  def report(self, step: int) -> dict:
    now = time.time()
    if self.last_time is None:
      self.last_step, self.last_time = step, now
      return {}
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    return {'steps_per_sec': rate, 'eta_sec': (self.total_steps - step) / max(rate, 1e-9)}

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` of non-training work (evaluation) out of the current window's rate."""
    if self.last_time is not None:
      self.last_time += seconds


def format_eta(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def log_line(step: int, total: int, scalars: dict, progress: dict) -> None:
  parts = [f'step {step}/{total}'] + [f'{k}={v:.4g}' for k, v in scalars.items()]
  if progress:
    parts += [f"{progress['steps_per_sec']:.2f} steps/s"]
    parts += [f"{progress['tokens_per_sec']:,.0f} tokens/s"] if 'tokens_per_sec' in progress else []
    parts += [f"ETA {format_eta(progress['eta_sec'])}"]
  logging.info(' | '.join(parts))
