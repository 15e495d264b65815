"""Fréchet Video Distance: the Fréchet distance between Gaussians fitted to video features.

  stats_real = fvd.Statistics.of(features_real)     # features: [N, D], from any feature network
  stats_fake = fvd.Statistics.of(features_fake)
  fvd.frechet_distance(stats_real, stats_fake)     # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

The feature network is pluggable: anything mapping uint8 videos [B, T, H, W, 3] to features [B, D].
Two ship here: `eval.classifier` (a small video classifier trained on `shapes`, the embedded default)
and `eval.i3d` (the Kinetics-400 I3D that papers use, from a local checkpoint). FVD values are only
comparable between runs that use the same network, the same number of videos and the same preprocessing.
"""

import dataclasses
from typing import Callable, Iterable

import numpy as np
import scipy.linalg

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 videos [B, T, H, W, 3] -> features [B, D]


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean [D] and unbiased covariance [D, D] of N feature vectors (float64)."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int

  @classmethod
  def of(cls, features_nd) -> 'Statistics':
    f = np.asarray(features_nd, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
      raise ValueError(f'features must be [N >= 2, D]; got shape {f.shape}')
    return cls(mu=f.mean(axis=0), sigma=np.cov(f, rowvar=False), count=f.shape[0])

  def save(self, path: str) -> None:
    with open(path, 'wb') as f:  # exactly `path` (np.savez would append .npz to a bare name)
      np.savez(f, mu=self.mu, sigma=self.sigma, count=self.count)

  @classmethod
  def load(cls, path: str) -> 'Statistics':
    with np.load(path) as z:
      return cls(mu=z['mu'], sigma=z['sigma'], count=int(z['count']))


def frechet_distance(a: Statistics, b: Statistics) -> float:
  """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); >= 0, 0 for identical statistics."""
  if a.mu.shape != b.mu.shape:
    raise ValueError(f'feature sizes differ: {a.mu.shape} vs {b.mu.shape}')
  covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
  if not np.isfinite(covmean).all():  # singular product (few samples): regularize, as the FID code does
    eps = 1e-6 * np.eye(a.sigma.shape[0])
    covmean = scipy.linalg.sqrtm((a.sigma + eps) @ (b.sigma + eps))
  covmean = np.real(covmean)  # numerical noise leaves tiny imaginary parts
  diff = a.mu - b.mu
  value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean)
  return float(max(value, 0.0))


def features(feature_fn: FeatureFn, videos: Iterable[np.ndarray], batch_size: int = 64) -> np.ndarray:
  """[N, D] features of `videos` (an array [N, T, H, W, 3] or an iterable of [T, H, W, 3]), in batches."""
  out, chunk = [], []
  for v in videos:
    chunk.append(np.asarray(v))
    if len(chunk) == batch_size:
      out.append(np.asarray(feature_fn(np.stack(chunk))))
      chunk = []
  if chunk:
    out.append(np.asarray(feature_fn(np.stack(chunk))))
  if not out:
    raise ValueError('no videos')
  return np.concatenate(out)


def fvd(feature_fn: FeatureFn, real_videos, fake_videos, batch_size: int = 64) -> float:
  """FVD between two sets of uint8 videos [N, T, H, W, 3] under `feature_fn`."""
  real = Statistics.of(features(feature_fn, real_videos, batch_size))
  fake = Statistics.of(features(feature_fn, fake_videos, batch_size))
  return frechet_distance(real, fake)
