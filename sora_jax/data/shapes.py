"""The `shapes` dataset: one filled shape of a pure color moving in a straight line.

Each clip is `frames x height x width x 3` uint8 on a black background; the shape (circle,
square or triangle) keeps a constant velocity, stays fully in frame and moves at least a
quarter of the frame over the clip. The caption is `a {color} {shape} moving {direction}`
With `sizes`, each clip has its own size, drawn from a list such as '1x32x32,8x32x56,16x56x32'
(native sizes, for packing), and a one-frame clip is an image captioned `a {color} {shape}`.

A TFDS `GeneratorBasedBuilder` writing `array_record` files, so it builds and reads without
TensorFlow. Generation is a pure function of (seed, split, index): the same config always gives
the same records. The builder config name encodes every parameter, so differently sized
datasets live side by side in one `data_dir`.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from sora_jax import UsageError, data

COLORS = {
    'red': (255, 0, 0),
    'green': (0, 255, 0),
    'blue': (0, 0, 255),
    'yellow': (255, 255, 0),
    'cyan': (0, 255, 255),
    'magenta': (255, 0, 255),
    'white': (255, 255, 255),
}
SHAPES = ('circle', 'square', 'triangle')
# Unit displacement (dy, dx) per direction; y grows downward, as in image rows.
DIRECTIONS = {'left': (0, -1), 'right': (0, 1), 'up': (-1, 0), 'down': (1, 0)}
COLOR_NAMES = tuple(COLORS)
DIRECTION_NAMES = tuple(DIRECTIONS)


def class_label(color: int, shape: int, direction: int) -> int:
  """The record's class for class-conditional models: one of 7 x 3 x 4 = 84 (color, shape, direction)."""
  return (int(color) * len(SHAPES) + int(shape)) * len(DIRECTIONS) + int(direction)


def caption(color: str, shape: str, direction: str | None) -> str:
  """'a red circle moving right'; an image (direction None) is 'a red circle'."""
  return f'a {color} {shape}' + ('' if direction is None else f' moving {direction}')


def parse_caption(text: str) -> tuple[str, str, str | None] | None:
  """Inverse of `caption`: (color, shape, direction or None for an image), or None for another sentence."""
  words = text.strip().lower().split()
  if not (len(words) == 3 or (len(words) == 5 and words[3] == 'moving')) or words[0] != 'a':
    return None
  color, shape, direction = words[1], words[2], words[4] if len(words) == 5 else None
  if color not in COLORS or shape not in SHAPES or direction not in (None, *DIRECTIONS):
    return None
  return color, shape, direction


def shape_mask(shape: str, size: int, cy: float, cx: float, height: int, width: int) -> np.ndarray:
  """Boolean [height, width] mask of a shape whose bounding box is `size` px, centred at (cy, cx)."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # pixel centres
  dy, dx = yy - cy, xx - cx
  half = size / 2
  if shape == 'circle':
    return dy**2 + dx**2 <= half**2
  if shape == 'square':
    return (np.abs(dy) <= half) & (np.abs(dx) <= half)
  if shape == 'triangle':  # apex up, base at the bottom of the box
    inside_rows = (dy >= -half) & (dy <= half)
    half_width_at_row = (dy + half) / 2  # 0 at the apex, `half` at the base
    return inside_rows & (np.abs(dx) <= half_width_at_row)
  raise ValueError(f'unknown shape {shape!r}; expected one of {SHAPES}')


def render_clip(color: str, shape: str, direction: str, *, frames: int, height: int, width: int,
                object_size: int, start_yx: tuple[float, float], displacement: float) -> np.ndarray:
  """[frames, height, width, 3] uint8 clip of one shape moving `displacement` px in total."""
  dy, dx = DIRECTIONS[direction]
  video = np.zeros((frames, height, width, 3), np.uint8)
  rgb = np.array(COLORS[color], np.uint8)
  half = object_size / 2
  for f in range(frames):
    step = displacement * f / max(frames - 1, 1)
    # Snapping the box corner to whole pixels makes every frame an exact translate of the first.
    cy = round(start_yx[0] + dy * step - half) + half
    cx = round(start_yx[1] + dx * step - half) + half
    mask = shape_mask(shape, object_size, cy, cx, height, width)
    video[f][mask] = rgb
  return video


def random_clip(rng: np.random.Generator, *, frames: int, height: int, width: int,
                object_size: int, image_captions: bool = False) -> dict:
  """Draws attributes, start and speed; returns the clip with its caption and labels.
  `image_captions`: a one-frame clip is captioned as an image, without motion (native-size datasets)."""
  color = int(rng.integers(len(COLORS)))
  shape = int(rng.integers(len(SHAPES)))
  direction = int(rng.integers(len(DIRECTIONS)))
  dy, dx = DIRECTIONS[DIRECTION_NAMES[direction]]
  half = object_size / 2
  extent = height if dy else width  # the axis of motion
  max_disp = extent - object_size
  min_disp = min(extent / 4, max_disp)
  displacement = float(rng.uniform(min_disp, max_disp))
  # Start so that the whole path stays in frame.
  lo, hi = half, extent - half - displacement
  along = float(rng.uniform(lo, hi)) if (dy + dx) > 0 else float(rng.uniform(lo + displacement, extent - half))
  across_extent = width if dy else height
  across = float(rng.uniform(half, across_extent - half))
  start_yx = (along, across) if dy else (across, along)
  names = COLOR_NAMES[color], SHAPES[shape], DIRECTION_NAMES[direction]
  video = render_clip(*names, frames=frames, height=height, width=width,
                      object_size=object_size, start_yx=start_yx, displacement=displacement)
  text = caption(*names[:2], None if frames == 1 and image_captions else names[2])  # one frame shows no motion
  return dict(video=video, caption=text, color=color, shape=shape, direction=direction)


def parse_sizes(sizes: str) -> list[tuple[int, int, int]]:
  """'1x32x32,8x32x56' -> [(1, 32, 32), (8, 32, 56)]; a malformed list is a UsageError."""
  try:
    out = [tuple(int(v) for v in item.lower().split('x')) for item in sizes.split(',') if item.strip()]
  except ValueError:
    out = []
  if not out or any(len(size) != 3 or min(size) < 1 for size in out):
    raise UsageError(f'config.data.sizes={sizes!r}: give FRAMESxHEIGHTxWIDTH items separated by commas, '
                     'e.g. "1x32x32,8x32x56,16x56x32"')
  return out


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  frames: int = 8
  height: int = 32
  width: int = 32
  object_size: int = 12
  num_train: int = 8192
  num_validation: int = 512
  seed: int = 0
  sizes: str = ''  # native sizes: each clip drawn from these 'TxHxW,...' (frames/height/width unused)


def make_config(**kwargs) -> ShapesConfig:
  """A builder config whose name records every generation parameter."""
  fields = {f.name: f.default for f in dataclasses.fields(ShapesConfig)
            if f.name in ('frames', 'height', 'width', 'object_size', 'num_train', 'num_validation', 'seed', 'sizes')}
  fields.update(kwargs)
  fields['sizes'] = fields['sizes'] or ''
  sizes = parse_sizes(fields['sizes']) if fields['sizes'] else [(fields['frames'], fields['height'], fields['width'])]
  for _, height, width in sizes:
    if fields['object_size'] > min(height, width):
      raise UsageError(f"config.data.object_size={fields['object_size']} does not fit in a {height}x{width} frame")
  name = 'f{frames}_h{height}_w{width}_o{object_size}_n{num_train}_v{num_validation}_s{seed}'.format(**fields)
  if fields['sizes']:  # fixed-size datasets keep their names
    fields['sizes'] = ','.join('x'.join(map(str, size)) for size in sizes)
    name = 'native_{}_o{object_size}_n{num_train}_v{num_validation}_s{seed}'.format(
        fields['sizes'].replace(',', '-'), **{k: v for k, v in fields.items() if k != 'sizes'})
  return ShapesConfig(name=name, **fields)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Synthetic moving-shape clips with captions (see the module docstring)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'Box corners snapped to whole pixels: frames are exact translates.'}
  BUILDER_CONFIGS = [make_config()]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'video': (tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding='bytes')
                      if c.sizes else tfds.features.Tensor(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8)),
            'caption': tfds.features.Text(),
            'color': tfds.features.ClassLabel(names=COLOR_NAMES),
            'shape': tfds.features.ClassLabel(names=SHAPES),
            'direction': tfds.features.ClassLabel(names=DIRECTION_NAMES),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: every clip is generated
    c = self.builder_config
    return {'train': self._generate_examples(0, c.num_train),
            'validation': self._generate_examples(1, c.num_validation)}

  def _generate_examples(self, split_id: int, count: int):
    c = self.builder_config
    sizes = parse_sizes(c.sizes) if c.sizes else None
    for index in range(count):
      rng = np.random.default_rng([c.seed, split_id, index])
      frames, height, width = c.frames, c.height, c.width
      if sizes:  # its own stream: the clip's draws are those of a fixed-size clip of that size
        frames, height, width = sizes[np.random.default_rng([c.seed, split_id, index, 1]).integers(len(sizes))]
      yield index, random_clip(rng, frames=frames, height=height, width=width, object_size=c.object_size,
                               image_captions=bool(sizes))


def build(data_dir: str | None = None, **kwargs) -> Shapes:
  """Builds (once) and returns the shapes builder for these parameters."""
  config = make_config(**kwargs)
  known = {c.name for c in Shapes.BUILDER_CONFIGS}  # TFDS refuses a custom config named like these
  return data.prepare(lambda: Shapes(config=config.name if config.name in known else config, data_dir=data_dir))
