"""The `folder` dataset: a user's own video clips, one clip per file, with captions.

Input: a folder, searched recursively, of .mp4 .webm .mov .mkv .avi files (any case), decoded with
PyAV (it bundles FFmpeg's libraries: no ffmpeg executable needed). Captions come from a sidecar
at the folder root, `captions.jsonl` (lines `{"file": "relative/path.mp4", "caption": "..."}`)
or `captions.csv` (columns file,caption), or from a `.txt` file next to a clip with the same stem;
the sidecar wins over a `.txt`, and `captions.jsonl` over `captions.csv`. A clip without a caption
is kept with the empty caption "" (useful for unconditional training and caption dropout).

Each readable clip becomes one record: `video` uint8 [frames, height, width, 3] and `caption`.
The clip is the first `frames` frames at `fps`: output frame i is the source frame whose
timestamp is nearest to start + i / fps, so any source frame rate works and motion keeps its
real speed. Frames are shown as a player would (rotation metadata applied, non-square pixels
widened), scaled to cover height x width and center-cropped: never stretched.

With `sizes` ('TxHxW,...', e.g. '16x32x32,16x32x56,16x56x32,1x32x32'), each clip keeps its framing
instead: it gets the size whose aspect ratio is nearest its own (then the longest duration it has),
and is cut to it as above, so clips of several sizes train in buckets or packed (see `choose_size`).

Bad input is skipped and counted, never fatal: unreadable files (corrupt, truncated, not a video)
and clips shorter than the requested duration. The counts and the file names are logged and
saved in the dataset's `metadata.json` (also `builder.info.metadata`).

A TFDS `GeneratorBasedBuilder` writing `array_record` files, so it builds and reads without
TensorFlow. The builder config name encodes every parameter and a fingerprint of the folder
(clip paths and sizes, caption text): a changed folder builds a new version next to the old one
instead of silently reusing stale records, and differently sized versions live side by side.
"""

import csv
import math
import dataclasses
import hashlib
import json
import os
import re

import av
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from sora_jax import UsageError, data

VIDEO_SUFFIXES = ('.mp4', '.webm', '.mov', '.mkv', '.avi')
CAPTIONS_JSONL = 'captions.jsonl'
CAPTIONS_CSV = 'captions.csv'


# --- Finding clips and their captions -----------------------------------------------------------

def find_clips(folder: str) -> list[str]:
  """Relative paths ('/'-separated, sorted) of the video files under `folder`. Hidden files and
  folders (a leading '.') are left out: they are editor or macOS debris (`._clip.mp4`), not clips."""
  clips = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    for name in files:
      if not name.startswith('.') and name.lower().endswith(VIDEO_SUFFIXES):
        clips.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, '/'))
  return sorted(clips)


def _normalize(path: str) -> str:
  """A sidecar's file name as `find_clips` spells it ('./a\\b.mp4' -> 'a/b.mp4')."""
  return os.path.normpath(path.strip().replace('\\', '/')).replace(os.sep, '/')


def _read_sidecar(path: str) -> dict[str, str]:
  """{relative path: caption} from captions.jsonl or captions.csv; a malformed file is a UsageError
  naming the line, because a silently half-read caption file would train on wrong captions."""
  captions = {}
  with open(path, encoding='utf-8-sig', newline='') as f:  # -sig: spreadsheets write a BOM
    if path.endswith('.jsonl'):
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          entry = json.loads(line)
          captions[_normalize(entry['file'])] = str(entry['caption'])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
          raise UsageError(f'{path}:{line_number}: expected {{"file": ..., "caption": ...}}: '
                           f'{type(e).__name__}: {e}') from None
    else:
      reader = csv.DictReader(f)
      if not {'file', 'caption'} <= set(reader.fieldnames or ()):
        raise UsageError(f'{path}: expected a header row with columns file,caption, got {reader.fieldnames}')
      for row in reader:
        if row['file']:
          captions[_normalize(row['file'])] = row['caption'] or ''
  return captions


def read_captions(folder: str, clips: list[str]) -> dict[str, str]:
  """{clip: caption} for the clips that have one (see the module docstring for the sources)."""
  captions = {}
  for name in (CAPTIONS_JSONL, CAPTIONS_CSV):
    sidecar = os.path.join(folder, name)
    if os.path.isfile(sidecar):
      captions = {**_read_sidecar(sidecar), **captions}  # an earlier (higher priority) source wins
  unknown = set(captions) - set(clips)
  if unknown:
    logging.warning('%s: captions for %d files that are not clips here, e.g. %s', folder, len(unknown),
                    sorted(unknown)[:3])
  for clip in clips:
    text_file = os.path.join(folder, os.path.splitext(clip)[0] + '.txt')
    if clip not in captions and os.path.isfile(text_file):
      with open(text_file, encoding='utf-8-sig') as f:
        captions[clip] = f.read().strip()
  return {clip: captions[clip].strip() for clip in clips if clip in captions}


def fingerprint(folder: str, clips: list[str]) -> str:
  """A short hash of what the records depend on: clip paths and sizes, and all caption text.
  (Sizes rather than modification times, so a copied folder keeps its fingerprint.)"""
  digest = hashlib.sha256()
  for clip in clips:
    digest.update(f'{clip}\0{os.path.getsize(os.path.join(folder, clip))}\n'.encode())
  digest.update(json.dumps(read_captions(folder, clips), sort_keys=True).encode())
  return digest.hexdigest()[:12]


def assign_splits(clips: list[str], validation_fraction: float) -> dict[str, list[str]]:
  """A deterministic split that is stable as the folder grows: a clip is in validation when a hash
  of its path falls below `validation_fraction`, so adding clips never moves the others. With
  at least 2 clips and a fraction > 0, validation gets at least one (the lowest hash)."""
  def unit_hash(clip):
    return int.from_bytes(hashlib.sha256(clip.encode()).digest()[:8], 'big') / 2**64
  validation = [c for c in clips if unit_hash(c) < validation_fraction]
  if not validation and len(clips) >= 2 and validation_fraction > 0:
    validation = [min(clips, key=unit_hash)]
  held_out = set(validation)
  return {'train': [c for c in clips if c not in held_out], 'validation': validation}


# --- Decoding one clip -----------------------------------------------------------------------------

def pick_frames(timed_frames, frames: int, fps: float) -> list | None:
  """From (time, frame) pairs in display order, the frame nearest to start + i / fps for
  i < `frames` (start: the first frame's time; ties go to the earlier frame), or None when the
  video ends before the last target (more than half a source frame before it). Stops reading as
  soon as it has all the frames, so only the start of a long video is decoded."""
  picked, start, prev, gap = [], None, None, 0.0
  for time, frame in timed_frames:
    start = time if start is None else start
    while len(picked) < frames and time >= start + len(picked) / fps:
      target = start + len(picked) / fps
      picked.append(prev[1] if prev is not None and target - prev[0] <= time - target + 1e-9 else frame)
    if len(picked) == frames:
      return picked
    gap = time - prev[0] if prev is not None else gap
    prev = (time, frame)
  if start is None:
    raise ValueError('no frame could be decoded')
  while len(picked) < frames and start + len(picked) / fps - prev[0] <= gap / 2 + 1e-9:
    picked.append(prev[1])  # the last frame still covers targets within half a frame of it
  return picked if len(picked) == frames else None


def fit(image: Image.Image, height: int, width: int, pixel_aspect: float = 1.0) -> np.ndarray:
  """Scales `image` to cover height x width and crops the center: uint8 [height, width, 3].
  The crop box is computed in display units (stored pixels are `pixel_aspect` wide) and resampled
  in one step, so the picture keeps its shape exactly (no rounding of an intermediate size)."""
  w, h = image.size
  display_w = w * pixel_aspect
  if display_w * height > h * width:  # wider than the target: trim left and right
    crop = h * width / height / pixel_aspect
    box = ((w - crop) / 2, 0, (w + crop) / 2, h)
  else:  # taller: trim top and bottom
    crop = display_w * height / width
    box = (0, (h - crop) / 2, w, (h + crop) / 2)
  return np.asarray(image.convert('RGB').resize((width, height), Image.Resampling.BICUBIC, box=box))


_ROTATIONS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def read_frames(path: str, *, frames: int, fps: float) -> tuple[list, float] | None:
  """(the picked `av.VideoFrame`s, the stream's pixel aspect ratio) of the clip's start (see
  `pick_frames`); None when the video is too short. Raises (any exception) when the file is
  unreadable: PyAV raises `av.error.InvalidDataError` for corrupt and truncated files."""
  with av.open(path) as container:
    if not container.streams.video:
      raise ValueError('no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    rate = float(stream.average_rate or 0)

    def timed_frames():
      for index, frame in enumerate(container.decode(stream)):
        if frame.time is not None:
          yield frame.time, frame
        elif rate:
          yield index / rate, frame
        else:
          raise ValueError('frames have no timestamps and the stream no frame rate')

    picked = pick_frames(timed_frames(), frames, fps)
    return None if picked is None else (picked, float(stream.sample_aspect_ratio or 1) or 1.0)


def display_aspect(frame, pixel_aspect: float) -> float:
  """Width / height of a decoded frame as a player shows it (non-square pixels, rotation metadata)."""
  aspect = frame.width * pixel_aspect / frame.height
  quarter_turns = round((getattr(frame, 'rotation', 0) or 0) / 90) % 4
  return 1 / aspect if quarter_turns % 2 else aspect


def choose_size(path: str, sizes: list, fps: float) -> tuple[int, int, int] | None:
  """The (T, H, W) of `sizes` a clip is cut to: the one whose aspect ratio (W / H) is nearest the clip's
  (in log ratio, so 2:1 and 1:2 are equally far from 1:1), among those the clip is long enough for; ties
  go to more frames, then more pixels. None when it is too short for every size. Raises when unreadable."""
  for frames in sorted({size[0] for size in sizes}, reverse=True):  # decodes only the clip's start
    read = read_frames(path, frames=frames, fps=fps)
    if read is not None:
      break
  else:
    return None
  aspect = display_aspect(read[0][0], read[1])
  return min((size for size in sizes if size[0] <= frames),
             key=lambda s: (round(abs(math.log(aspect * s[1] / s[2])), 6), -s[0], -s[1] * s[2]))


def decode_clip(path: str, *, frames: int, height: int, width: int, fps: float) -> np.ndarray | None:
  """uint8 [frames, height, width, 3]: the first `frames` frames at `fps`, upright, fitted (see
  `fit`); None when the video is too short. Raises when the file is unreadable."""
  read = read_frames(path, frames=frames, fps=fps)
  if read is None:
    return None
  picked, pixel_aspect = read
  out = []
  for frame in picked:
    image = frame.to_image()
    # Phones store portrait video as landscape plus a rotation (counterclockwise) for the player.
    quarter_turns = round((getattr(frame, 'rotation', 0) or 0) / 90) % 4
    if quarter_turns:
      image = image.transpose(_ROTATIONS[quarter_turns])
    out.append(fit(image, height, width, pixel_aspect if quarter_turns % 2 == 0 else 1 / pixel_aspect))
  return np.stack(out)


# --- The TFDS builder ------------------------------------------------------------------------------

@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  folder: str = ''
  frames: int = 16
  height: int = 64
  width: int = 64
  fps: float = 8.0
  validation_fraction: float = 0.05
  sizes: str = ''  # 'TxHxW,...': each clip cut to the size nearest its aspect ratio (frames/height/width unused)


def make_config(folder: str, *, frames: int, height: int, width: int, fps: float,
                validation_fraction: float = 0.05, sizes: str = '') -> FolderConfig:
  """A config whose name records the folder (name and fingerprint) and every parameter."""
  if min(frames, height, width) < 1 or not fps > 0 or not 0 <= validation_fraction < 1:
    raise UsageError(f'{folder}: need frames, height, width >= 1, fps > 0 and 0 <= validation_fraction < 1; '
                     f'got {frames}, {height}, {width}, {fps}, {validation_fraction}')
  folder = os.path.abspath(folder)
  slug = re.sub(r'[^A-Za-z0-9]+', '_', os.path.basename(folder)).strip('_')[:40] or 'folder'
  shape = f'f{frames}_h{height}_w{width}'
  if sizes:  # canonical spelling, so equal lists share a dataset
    from sora_jax.data.shapes import parse_sizes  # pylint: disable=g-import-not-at-top
    sizes = ','.join('x'.join(map(str, size)) for size in parse_sizes(sizes))
    shape = 'sizes_' + sizes.replace(',', '-')
  name = f'{slug}_{fingerprint(folder, find_clips(folder))}_{shape}_fps{fps:g}_val{validation_fraction:g}'
  return FolderConfig(name=name, folder=folder, frames=frames, height=height, width=width, fps=fps,
                      validation_fraction=validation_fraction, sizes=sizes or '')


def config_sizes(c: FolderConfig) -> list[tuple[int, int, int]]:
  """The sizes clips are cut to: `c.sizes`, or the one frames x height x width."""
  from sora_jax.data.shapes import parse_sizes  # pylint: disable=g-import-not-at-top
  return parse_sizes(c.sizes) if c.sizes else [(c.frames, c.height, c.width)]


class VideoFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of the user's video clips with captions (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []  # every config is made by `make_config` for one folder

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'video': (tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding='bytes')
                      if c.sizes else tfds.features.Tensor(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8)),
            'caption': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),  # the build counts; saved as metadata.json after the build
    )

  def _split_generators(self, dl_manager):
    """Checks every clip first (decoding only its start), so that the splits are assigned over
    readable clips and neither is ever empty (TFDS cannot write an empty split); the records are
    decoded again while they are written, which keeps memory at one clip (about 1.5x the decoding
    time of a single pass that would hold every clip)."""
    del dl_manager  # nothing to download: the clips are local
    c = self.builder_config
    clips = find_clips(c.folder)
    captions = read_captions(c.folder, clips)
    stats = self.info.metadata  # saved as metadata.json once the records are written
    stats.update(folder=c.folder, clips_found=len(clips), read_ok=0, skipped_unreadable=0, skipped_too_short=0,
                 no_caption=0, unreadable_files={}, too_short_files=[], no_caption_files=[], clips_per_size={})
    readable, size_of = [], {}
    for clip in clips:
      try:
        size = choose_size(os.path.join(c.folder, clip), config_sizes(c), c.fps)
      except Exception as e:  # noqa: BLE001 -- a bad file is skipped and counted, never fatal
        stats['skipped_unreadable'] += 1
        stats['unreadable_files'][clip] = f'{type(e).__name__}: {e}'[:200]
        logging.warning('%s: skipping unreadable %s: %s: %s', c.folder, clip, type(e).__name__, e)
        continue
      if size is None:
        stats['skipped_too_short'] += 1
        stats['too_short_files'].append(clip)
        continue
      readable.append(clip)
      size_of[clip] = size
      name = 'x'.join(map(str, size))
      stats['clips_per_size'][name] = stats['clips_per_size'].get(name, 0) + 1
      if clip not in captions:
        stats['no_caption'] += 1
        stats['no_caption_files'].append(clip)
    stats['read_ok'] = len(readable)
    if not readable:
      raise UsageError(f'{c.folder}: no readable clip among {len(clips)} video files ({stats["skipped_unreadable"]} '
                       f'unreadable, {stats["skipped_too_short"]} shorter than {min_duration(c):.2f} s)')
    return {split: self._generate_examples(split_clips, captions, size_of)
            for split, split_clips in assign_splits(readable, c.validation_fraction).items() if split_clips}

  def _generate_examples(self, clips: list[str], captions: dict[str, str], size_of: dict[str, tuple]):
    c = self.builder_config
    for clip in clips:
      frames, height, width = size_of[clip]
      video = decode_clip(os.path.join(c.folder, clip), frames=frames, height=height, width=width, fps=c.fps)
      if video is None:  # it was long enough a moment ago: the folder changed during the build
        raise UsageError(f'{c.folder}: {clip} changed while the dataset was being built')
      yield clip, {'video': video, 'caption': captions.get(clip, '')}


def min_duration(c: FolderConfig) -> float:
  """Seconds of video a clip needs: its last frame is at (frames - 1) / fps (the shortest size's)."""
  return (min(size[0] for size in config_sizes(c)) - 1) / c.fps


def summary(builder: VideoFolder) -> str:
  """One line of build counts, for logs and error messages."""
  s = builder.info.metadata
  splits = ', '.join(f'{name} {split.num_examples}' for name, split in builder.info.splits.items())
  per_size = ', '.join(f'{n} at {size}' for size, n in sorted(s.get('clips_per_size', {}).items()))
  splits += f'; {per_size}' if builder.builder_config.sizes else ''
  return (f'{s["read_ok"]} of {s["clips_found"]} clips read ({splits}); skipped {s["skipped_unreadable"]} '
          f'unreadable, {s["skipped_too_short"]} too short (under {min_duration(builder.builder_config):.2f} s); '
          f'{s["no_caption"]} without a caption (kept with ""); file names in {builder.data_dir}/metadata.json')


def build(folder: str, data_dir: str | None, *, frames: int, height: int, width: int, fps: float,
          validation_fraction: float = 0.05, sizes: str = '') -> VideoFolder:
  """Builds (once per folder content and parameters) and returns the builder of `folder`'s clips.
  A UsageError naming the folder when it does not exist or has no usable clip."""
  if not os.path.isdir(folder):
    raise UsageError(f'{folder}: no such folder of video clips')
  if not find_clips(folder):
    raise UsageError(f'{folder}: no video files ({" ".join(VIDEO_SUFFIXES)}) in this folder')
  config = make_config(folder, frames=frames, height=height, width=width, fps=fps,
                       validation_fraction=validation_fraction, sizes=sizes)
  builder = VideoFolder(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    builder = data.prepare(lambda: VideoFolder(config=config, data_dir=data_dir))
    stats = builder.info.metadata
    skipped = stats['skipped_unreadable'] + stats['skipped_too_short']
    logging.log(logging.WARNING if skipped else logging.INFO, '%s: %s', folder, summary(builder))
  return builder
