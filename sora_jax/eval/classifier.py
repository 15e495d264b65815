"""A small video classifier of the `shapes` world: FVD features and a learned prompt-adherence judge.

  clf = classifier.load_or_train(frames=8, height=32, width=32, object_size=12)   # ~30 s, then cached
  clf.features(videos)        # uint8 [B, T, H, W, 3] -> [B, 128]: the embedded default for FVD
  clf.predict(videos)         # -> {'color': [B], 'shape': [B], 'direction': [B]} class indices
  clf.adherence(videos, prompts)  # fractions whose predicted color / shape / direction match the prompt

No weights can be downloaded, so the network trains here, on clips rendered on the fly by
`shapes.random_clip` (a seed stream of its own, never the dataset's), and is cached per clip size
in $SORA_JAX_CACHE (default ~/.cache/sora_jax), trained for $SORA_JAX_CLASSIFIER_STEPS steps
(default 600; the cached file's name says how many; the tests use fewer). Two spacetime patch
layers (2x4x4 pixels, then 2x2x2 in space and time, as matmuls) and a mean over positions give a
128-d embedding; three linear heads read it.
"""

import dataclasses
import os
import time

import einops
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from sora_jax import pretrained
from sora_jax.data import shapes

VERSION = 1  # bump when the architecture or training changes: cached weights are then retrained
HEADS = {'color': shapes.COLOR_NAMES, 'shape': shapes.SHAPES, 'direction': shapes.DIRECTION_NAMES}


@dataclasses.dataclass(frozen=True)
class ClipSize:
  frames: int = 8
  height: int = 32
  width: int = 32
  object_size: int = 12

  @property
  def name(self) -> str:
    return f'{self.frames}x{self.height}x{self.width}_object{self.object_size}'


class VideoClassifier(nnx.Module):
  """uint8 videos [B, T, H, W, 3] -> embedding [B, features] -> logits per head.

  Two non-overlapping spacetime patch layers (2x4x4 pixels, then 2x2x2 of those: 4 frames x 8 x 8
  pixels), matmuls rather than 3D convolutions (which XLA runs slowly on CPUs), then a mean over
  positions. Clips are padded to whole patches (time by repeating the last frame, space with black).
  """

  def __init__(self, width: int = 64, features: int = 128, *, rngs: nnx.Rngs):
    self.patch1 = nnx.Linear(2 * 4 * 4 * 3, width, rngs=rngs)
    self.patch2 = nnx.Linear(8 * width, 2 * width, rngs=rngs)
    self.embed = nnx.Linear(2 * width, features, rngs=rngs)
    self.heads = nnx.Dict({k: nnx.Linear(features, len(v), rngs=rngs) for k, v in HEADS.items()})

  def features(self, videos_bthwc):
    x = jnp.asarray(videos_bthwc, jnp.float32) / 127.5 - 1.0
    _, t, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, -t % 4), (0, 0), (0, 0), (0, 0)), mode='edge')
    x = jnp.pad(x, ((0, 0), (0, 0), (0, -h % 8), (0, -w % 8), (0, 0)), constant_values=-1.0)
    x = jax.nn.gelu(self.patch1(_patchify(x, (2, 4, 4))))
    x = jax.nn.gelu(self.patch2(_patchify(x, (2, 2, 2))))
    return self.embed(x.mean(axis=(1, 2, 3)))  # [B, features]

  def __call__(self, videos_bthwc) -> dict:
    h = jax.nn.gelu(self.features(videos_bthwc))
    return {k: head(h) for k, head in self.heads.items()}


def _patchify(x_bthwc, patch):
  """[B, T, H, W, C] -> [B, T/pt, H/ph, W/pw, pt*ph*pw*C]."""
  pt, ph, pw = patch
  return einops.rearrange(x_bthwc, 'b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)', pt=pt, ph=ph, pw=pw)


def labelled_batch(rng: np.random.Generator, size: ClipSize, batch: int, noise: float = 0.0) -> tuple[np.ndarray, dict]:
  """Rendered clips uint8 [batch, T, H, W, 3] and their labels; `noise`: the largest pixel noise std
  (uint8 units, drawn per clip), so that generated videos' artifacts are not out of distribution."""
  clips = [shapes.random_clip(rng, frames=size.frames, height=size.height, width=size.width,
                              object_size=size.object_size) for _ in range(batch)]
  videos = np.stack([c['video'] for c in clips])
  if noise:
    std = rng.uniform(0, noise, (batch, 1, 1, 1, 1))
    videos = np.clip(videos + rng.normal(size=videos.shape) * std, 0, 255).astype(np.uint8)
  return videos, {k: np.array([c[k] for c in clips]) for k in HEADS}


def train(size: ClipSize, *, steps: int = 600, batch: int = 64, learning_rate: float = 3e-3,
          noise: float = 24.0, seed: int = 1234) -> 'Classifier':
  """Trains the classifier on freshly rendered clips of `size`; logs accuracy as it goes."""
  model = VideoClassifier(rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model)
  warmup = min(50, steps // 2)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                      learning_rate / 20))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, videos, labels):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(videos)
      losses = [optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean() for k in HEADS]
      return sum(losses), {k: (logits[k].argmax(-1) == labels[k]).mean() for k in HEADS}
    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc

  rng = np.random.default_rng(seed)
  start = time.time()
  for i in range(steps):
    videos, labels = labelled_batch(rng, size, batch, noise)
    params, opt_state, loss, acc = step(params, opt_state, videos, labels)
    if (i + 1) % 100 == 0 or i + 1 == steps:
      logging.info('shapes classifier %s: step %d/%d loss %.4f accuracy %s (%.0f s)', size.name, i + 1, steps,
                   float(loss), {k: round(float(v), 3) for k, v in acc.items()}, time.time() - start)
  return Classifier(nnx.merge(graphdef, params), size)


class Classifier:
  """A trained `VideoClassifier` with jitted, numpy-in numpy-out helpers."""

  def __init__(self, model: VideoClassifier, size: ClipSize):
    self.size = size
    graphdef, self.params = nnx.split(model)
    self._features = jax.jit(lambda p, v: nnx.merge(graphdef, p).features(v))
    self._logits = jax.jit(lambda p, v: nnx.merge(graphdef, p)(v))

  def features(self, videos_bthwc) -> np.ndarray:
    return np.asarray(self._features(self.params, np.asarray(videos_bthwc)))

  def predict(self, videos_bthwc) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.argmax(-1)) for k, v in self._logits(self.params, np.asarray(videos_bthwc)).items()}

  def adherence(self, videos_bthwc, prompts: list[str], batch_size: int = 64) -> dict:
    """Fractions of videos whose predicted color, shape and direction (and all three) match the prompt."""
    predicted = {k: [] for k in HEADS}
    for i in range(0, len(prompts), batch_size):
      for k, v in self.predict(np.stack(videos_bthwc[i:i + batch_size])).items():
        predicted[k].extend(v)
    hits = {k: [] for k in (*HEADS, 'all')}
    for i, prompt in enumerate(prompts):
      parsed = shapes.parse_caption(prompt)
      if parsed is None:
        raise ValueError(f'not a shapes caption: {prompt!r}')
      row = {k: names[predicted[k][i]] == want for (k, names), want in zip(HEADS.items(), parsed)
             if want is not None}  # an image prompt names no direction
      for k, hit in row.items():
        hits[k].append(hit)
      hits['all'].append(all(row.values()))
    return {k: float(np.mean(v)) for k, v in hits.items() if v}  # image prompts alone: no 'direction'

  def save(self, path: str) -> None:
    flat = pretrained.flatten(self.params.to_pure_dict())
    tmp = f'{path}.{os.getpid()}.tmp.npz'  # per process: several may share a cache folder
    np.savez(tmp, **{'/'.join(map(str, k)): np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)  # never a half-written cache

  @classmethod
  def restore(cls, path: str, size: ClipSize) -> 'Classifier':
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoClassifier(rngs=nnx.Rngs(0))))
    with np.load(path) as z:
      flat = {tuple(int(p) if p.isdigit() else p for p in k.split('/')): jnp.asarray(z[k]) for k in z.files}
    state.replace_by_pure_dict(pretrained.unflatten(flat))
    return cls(nnx.merge(graphdef, state), size)


def default_steps() -> int:
  value = os.environ.get('SORA_JAX_CLASSIFIER_STEPS', '600')
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f'$SORA_JAX_CLASSIFIER_STEPS={value!r}: expected a positive integer')
  return int(value)


def cache_path(size: ClipSize, cache_dir: str | None = None, steps: int | None = None) -> str:
  steps = steps or default_steps()
  cache_dir = cache_dir or os.environ.get('SORA_JAX_CACHE') or os.path.expanduser('~/.cache/sora_jax')
  return os.path.join(cache_dir, f'shapes_classifier_v{VERSION}_{size.name}_steps{steps}.npz')


def load_or_train(frames: int = 8, height: int = 32, width: int = 32, object_size: int = 12, *,
                  cache_dir: str | None = None, steps: int | None = None) -> Classifier:
  """The cached classifier for this clip size, trained first (about 30 s on a CPU) if missing."""
  size = ClipSize(frames, height, width, object_size)
  steps = steps or default_steps()
  path = cache_path(size, cache_dir, steps)
  if os.path.exists(path):
    try:
      return Classifier.restore(path, size)
    except Exception as e:  # noqa: BLE001 - a stale or damaged cache is retrained, never trusted
      logging.warning('shapes classifier cache %s unreadable (%s); retraining', path, e)
  logging.info('training the shapes classifier for %s clips (cached in %s)', size.name, path)
  clf = train(size, steps=steps)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    clf.save(path)
  except OSError as e:  # a read-only cache costs a retrain next time, never the run
    logging.warning('shapes classifier: cannot cache it in %s (%s); set $SORA_JAX_CACHE', path, e)
  return clf


def for_data(data_config) -> Classifier:
  """The classifier for a config's `shapes` clips."""
  return load_or_train(data_config.frames, data_config.height, data_config.width, data_config.object_size)
