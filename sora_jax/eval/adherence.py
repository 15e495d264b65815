"""Analytic prompt adherence for `shapes` videos: does a clip show the captioned color, shape, motion?

Measured directly on pixels, with no learned model:
  color      the nearest pure color to the mean RGB of the bright pixels;
  direction  the dominant axis and sign of the bright-pixel centroid's motion, first to last frame;
  shape      the fill ratio of the bright pixels in their bounding box (square 1, circle pi/4,
             triangle 1/2), averaged over frames;
and, for videos made from given frames, the path: the bright-pixel centroid per frame, its distance
from a true path or a straight line, and its speed.
"""

import numpy as np

from sora_jax.data import shapes

# Fill-ratio boundaries halfway between the ideal ratios (triangle 0.5, circle 0.785, square 1).
_TRIANGLE_CIRCLE = (0.5 + np.pi / 4) / 2
_CIRCLE_SQUARE = (np.pi / 4 + 1.0) / 2


def bright_mask(video_thwc: np.ndarray, threshold: int = 100) -> np.ndarray:
  """[T, H, W] bool: pixels whose brightest channel exceeds `threshold` (the background is black)."""
  return np.asarray(video_thwc).max(axis=-1) > threshold


def judge_color(video_thwc) -> str | None:
  mask = bright_mask(video_thwc)
  if not mask.any():
    return None
  mean_rgb = np.asarray(video_thwc, np.float32)[mask].mean(axis=0)
  names = list(shapes.COLORS)
  palette = np.array([shapes.COLORS[n] for n in names], np.float32)
  return names[int(np.argmin(((palette - mean_rgb) ** 2).sum(axis=1)))]


def judge_direction(video_thwc) -> str | None:
  c = centroids(video_thwc)
  if len(c) < 2 or not np.isfinite(c[[0, -1]]).all():
    return None
  dy, dx = c[-1] - c[0]
  if abs(dx) >= abs(dy):
    return 'right' if dx > 0 else 'left'
  return 'down' if dy > 0 else 'up'


def fill_ratio(video_thwc) -> float | None:
  ratios = []
  for m in bright_mask(video_thwc):
    ys, xs = np.nonzero(m)
    if len(ys):
      ratios.append(len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)))
  return float(np.mean(ratios)) if ratios else None


def judge_shape(video_thwc) -> str | None:
  ratio = fill_ratio(video_thwc)
  if ratio is None:
    return None
  if ratio < _TRIANGLE_CIRCLE:
    return 'triangle'
  return 'circle' if ratio < _CIRCLE_SQUARE else 'square'


# Paths, for prompting with frames (experiments/eval_prompting.py): where the object is, frame by frame.

def centroids(video_thwc) -> np.ndarray:
  """[T, 2] (y, x) centroid of the bright pixels per frame (NaN where a frame shows nothing)."""
  out = []
  for m in bright_mask(video_thwc):
    ys, xs = np.nonzero(m)
    out.append((ys.mean(), xs.mean()) if len(ys) else (np.nan, np.nan))
  return np.array(out)


def soft_centroids(x_bthwc) -> np.ndarray:
  """[b, T, 2] (y, x) centroids of brightness per frame of model outputs in [-1, 1] (max channel + 1:
  the black background weighs 0). A blurred estimate's centroid is where the model expects the object;
  on a clean clip it is `centroids`'."""
  weight = np.clip(np.asarray(x_bthwc, np.float32).max(-1) + 1.0, 0.0, None)  # [b, T, H, W]
  yy, xx = np.mgrid[0:weight.shape[2], 0:weight.shape[3]]  # pixel indices, as `centroids`
  total = weight.sum((2, 3)) + 1e-9
  return np.stack([(weight * yy).sum((2, 3)) / total, (weight * xx).sum((2, 3)) / total], -1)


def path_error(generated_thwc, truth_thwc, frames) -> float:
  """Mean centroid distance (px) over `frames`; inf where the generated video lost the object."""
  err = np.linalg.norm(centroids(generated_thwc)[frames] - centroids(truth_thwc)[frames], axis=-1)
  return float(np.mean(err)) if np.isfinite(err).all() else float('inf')


def linear_motion_error(video_thwc) -> float:
  """Mean distance (px) of the centroids from the best straight line at constant speed; inf where
  the object is lost."""
  c = centroids(video_thwc)
  if not np.isfinite(c).all():
    return float('inf')
  t = np.stack([np.ones(len(c)), np.arange(len(c))], axis=1)
  fit = t @ np.linalg.lstsq(t, c, rcond=None)[0]
  return float(np.mean(np.linalg.norm(c - fit, axis=-1)))


def speed(video_thwc, frames) -> float:
  """px/frame of the centroid over `frames` (a least-squares line); NaN where the object is lost."""
  c = centroids(video_thwc)[frames]
  if len(c) < 2 or not np.isfinite(c).all():
    return float('nan')
  t = np.flatnonzero(frames).astype(float)
  return float(np.linalg.norm(np.polyfit(t - t.mean(), c, 1)[0]))


def score(videos, prompts: list[str]) -> dict:
  """Fractions of videos whose color, direction and shape match their prompts (and all three), and
  `shape_<name>` / `color_<name>`: that attribute's fraction among the prompts naming that shape /
  color (which shape fails; which colors a model mixes up)."""
  hits = ({'color': [], 'direction': [], 'shape': [], 'all': []} | {f'shape_{name}': [] for name in shapes.SHAPES}
          | {f'color_{name}': [] for name in shapes.COLOR_NAMES})
  for v, prompt in zip(videos, prompts):
    parsed = shapes.parse_caption(prompt)
    if parsed is None:
      raise ValueError(f'not a shapes caption: {prompt!r}')
    color, shape, direction = parsed
    ok = dict(color=judge_color(v) == color, shape=judge_shape(v) == shape)
    if direction is not None:  # an image prompt names no motion
      ok['direction'] = judge_direction(v) == direction
    for key, hit in ok.items():
      hits[key].append(hit)
    hits[f'shape_{shape}'].append(ok['shape'])
    hits[f'color_{color}'].append(ok['color'])
    hits['all'].append(all(ok.values()))
  return {k: float(np.mean(v)) for k, v in hits.items() if v} | {'n': len(prompts)}  # no key without prompts
