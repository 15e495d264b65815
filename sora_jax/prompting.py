r"""Prompting with images and videos, all from one frame-conditioned model (`sample.generate`'s
`given` frames; training draws the masks, `sora_jax.diffusion.frame_conditioning`).

  image-to-video   keyframes(model, prompts, [(image, 0)])
  interpolation    keyframes(model, prompts, [(first, 0), (last, -1)])
  extension        extend(model, prompts, video) / extend(..., backward=True)
  editing (SDEdit) edit(model, prompts, video, strength=0.6)
  loops            any of the above with loop=True
  long videos      frames=N beyond the training length, in any mode

The model generates clips of the training length T. Longer outputs are made window by window:
each next window of T frames is given the last T/2 frames made so far (or the first T/2, going
backward) plus any keyframes it covers, and generates the rest. A loop regenerates the last T/2
frames as the bridge between the frames before them and the first T/4 frames of the video.

Images and videos of another size are resized to cover the output and center-cropped
(`read_image`, `read_video`, which say so in one line).
"""

import os
import time

import numpy as np
from absl import logging
from PIL import Image

from sora_jax import UsageError, metrics, video
from sora_jax.data.folder import fit


VIDEO_SUFFIXES = ('.mp4', '.mov', '.webm', '.avi', '.mkv')  # (a GIF opens as an image)


def fit_frames(frames_thwc: np.ndarray, height: int | None, width: int | None,
                path: str) -> tuple[np.ndarray, str | None]:
  """(frames [T, height, width, 3], a note if they were resized to cover and center-cropped); height and
  width None: as they are."""
  if frames_thwc.dtype != np.uint8 or frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
    raise UsageError(f'{path}: frames {frames_thwc.dtype} {frames_thwc.shape}; expected uint8 [T, H, W, 3]')
  h, w = frames_thwc.shape[1:3]
  height, width = height or h, width or w
  if (h, w) == (height, width):
    return frames_thwc, None
  out = np.stack([fit(Image.fromarray(f), height, width) for f in frames_thwc])
  return out, f'{path}: {w}x{h} resized and center-cropped to {width}x{height}'


def _is_video(path: str) -> bool:
  try:
    return len(video.read(path)) > 0
  except Exception:  # noqa: BLE001 -- av and PIL raise many kinds
    return False


def read_image(path: str, height: int, width: int) -> tuple[np.ndarray, str | None]:
  """(uint8 [height, width, 3], a note if it was resized); a file that is not an image (or is a
  video) is a UsageError."""
  try:
    with Image.open(path) as im:
      frames = getattr(im, 'n_frames', 1)
      if im.mode.startswith('I'):  # 16- or 32-bit gray, which convert('RGB') clips to white
        gray = np.asarray(im).astype(np.float64)
        scale = 257.0 if im.mode.startswith('I;16') or gray.max() > 255 else 1.0
        image = np.repeat(np.clip(np.round(gray / scale), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
      else:
        image = np.asarray(im.convert('RGB'))
  except (OSError, ValueError) as e:
    if os.path.isfile(path) and path.lower().endswith(VIDEO_SUFFIXES) and _is_video(path):
      raise UsageError(f'cannot read image {path}: it is a video; a keyframe is one image (.png, .jpg); '
                       'give a video with --extend') from None
    raise UsageError(f'cannot read image {path}: {getattr(e, "strerror", None) or e}') from None
  if frames > 1 and im.format != 'MPO':  # (a camera JPEG with an embedded preview is one photo)
    raise UsageError(f'cannot read image {path}: it has {frames} frames; a keyframe is one image '
                     '(.png, .jpg); give a video with --extend')
  frames, note = fit_frames(image[None], height, width, path)
  return frames[0], note


def read_video(path: str, height: int, width: int) -> tuple[np.ndarray, str | None]:
  """(uint8 [T, height, width, 3], a note if it was resized) of an .mp4 or .gif (an image: one frame);
  height and width None: at its own size."""
  if not os.path.isfile(path):
    raise UsageError(f'cannot read video {path}: no such file')
  try:
    frames = video.read(path)
  except Exception as e:  # noqa: BLE001 -- av and PIL raise many kinds
    try:  # a still image is a one-frame video
      image, note = read_image(path, height, width)
    except UsageError:
      raise UsageError(f'cannot read video {path}: {e}') from None
    return image[None], note
  if not len(frames):
    raise UsageError(f'cannot read video {path}: no frames')
  return fit_frames(frames, height, width, path)


def frame_index(index: int, frames: int, what: str) -> int:
  """Output frame `index` (negative: from the end) of `frames`; a UsageError naming `what` outside it."""
  i = index + frames if index < 0 else index
  if not 0 <= i < frames:
    raise UsageError(f'{what} @{index}: outside an output of {frames} frame{"s" if frames > 1 else ""}')
  return i


def windows(frames: int, window: int, backward: bool = False) -> list[int]:
  """Start frames of the generation windows covering [0, frames): consecutive windows overlap by
  window // 2 frames, the last one ends exactly at `frames` (backward: the first at 0)."""
  if frames <= window:
    return [0]
  step = window - window // 2
  starts = list(range(0, frames - window, step)) + [frames - window]
  return [frames - window - s for s in starts] if backward else starts


def native_sizes(cfg) -> bool:
  """Whether the model trained on clips of many sizes (packed rows of `config.data.sizes`)."""
  return bool(cfg.get('packing') and cfg.packing.get('row_length') and cfg.data.get('sizes'))


def window_length(cfg, frames: int, round_up: bool = True) -> int:
  """Frames made in one pass: the training length T, or for a model trained at native sizes
  (packed, `config.data.sizes`) the output's own length up to the longest clip it trained on (a
  clip: a multiple of the temporal patch, rounded up where it may be and the extra frames cut
  afterwards, so 15 frames are one pass of 16 rather than two overlapping passes of 14; an image: one
  frame). `round_up=False`: a window no longer than `frames` (a loop's bridge lies inside the output)."""
  if native_sizes(cfg):
    from sora_jax.data import shapes
    longest, patch = max(size[0] for size in shapes.parse_sizes(cfg.data.sizes)), cfg.model.patch[0]
    n = min(frames, longest)
    if n == 1:
      return 1
    up = -(-n // patch) * patch
    return up if round_up and up <= longest else max(n - n % patch, patch)
  return cfg.data.frames


def generate_frames(model, prompts: list, given: dict, *, frames: int | None = None, height: int | None = None,
                    width: int | None = None, backward: bool = False, loop: bool = False, seed: int = 0,
                    **sample_kw) -> np.ndarray:
  """uint8 [len(prompts), frames, H, W, 3] with frame i equal to `given[i]` (uint8 [H, W, 3], the same
  for every prompt) for each given index, the rest generated window by window (module docstring).
  Windows have the training length T (`window_length`); H, W: `height`, `width` or the config's.
  `sample_kw` go to `sample.generate` (steps, guidance scales, stochasticity, negative prompt)."""
  from sora_jax import sample
  cfg = model.config
  H, W = height or cfg.data.height, width or cfg.data.width
  frames = cfg.data.frames if frames is None else frames
  if frames < 1:
    raise UsageError(f'frames={frames}: need at least one frame')
  if isinstance(prompts, (str, bytes)):
    raise UsageError(f'prompts={prompts!r}: give a list of captions, e.g. ["a red circle"]')
  given = {frame_index(i, frames, 'given frame'): np.asarray(image) for i, image in given.items()}
  if loop:  # before any sampling
    check_loop(cfg, frames, keep=given)
  for i, image in given.items():
    if image.dtype != np.uint8 or image.shape != (H, W, 3):
      raise UsageError(f'given frame {i}: {image.dtype} {image.shape}; expected uint8 {(H, W, 3)} '
                       '(the output size; prompting.fit_frames resizes)')
  T = window_length(cfg, frames)
  b = len(prompts)
  out = np.zeros((b, max(frames, T), H, W, 3), np.uint8)
  known = np.zeros(max(frames, T), bool)
  for i, image in given.items():
    out[:, i], known[i] = image, True
  to_make, will_know = [], known.copy()  # the windows that generate something: (index, first frame)
  for w, start in enumerate(windows(max(frames, T), T, backward)):
    if not will_know[start:start + T].all():
      to_make.append((w, start))
      will_know[start:start + T] = True
  for done, (w, start) in enumerate(to_make, 1):
    began = time.time()
    window_known = known[start:start + T]
    any_given = window_known.any()
    clips = sample.generate(model, prompts, seed=seed + 7919 * w, given=out[:, start:start + T] if any_given else None,
                            given_mask=window_known if any_given else None, size=(T, H, W), **sample_kw)
    out[:, start:start + T] = clips
    known[start:start + T] = True
    if len(to_make) > 1:  # a long video: minutes on a CPU. The ETA is at the last window's pace (the first two
      seconds = time.time() - began  # also compile: without given frames, with them)
      logging.info('window %d/%d (frames %d-%d): %.1f s, ETA %s', done, len(to_make), start, start + T - 1,
                   seconds, metrics.format_eta(seconds * (len(to_make) - done)))
  out = out[:, :frames]
  if loop:
    out = close_loop(model, prompts, out, keep=sorted(given), seed=seed, **sample_kw)
  return out


def check_loop(cfg, frames: int, keep=()) -> int:
  """The window T of the loop's bridge (`close_loop`) for an output of `frames` frames; a UsageError
  if the output is shorter than one window, the window shorter than 4 frames, or every frame of the
  bridge (the last T // 2) is among the kept indices `keep` (negative: from the end)."""
  T = window_length(cfg, frames, round_up=False)
  if T < 4:
    raise UsageError(f'loop: needs a window of at least 4 frames; ' + (
        f'this model makes {T}' if T == window_length(cfg, 10**6) else f'an output of {frames} makes {T}'))
  if frames < T:
    raise UsageError(f'loop: needs an output of at least {T} frames (its bridge is one window), not {frames}')
  kept = {i + frames if i < 0 else i for i in keep}
  if all(i in kept for i in range(frames - T // 2, frames)):
    raise UsageError(f'loop: every frame of its bridge (the last {T // 2}) is given: nothing to remake')
  return T


def close_loop(model, prompts: list, videos: np.ndarray, *, keep=(), seed: int = 0, **sample_kw) -> np.ndarray:
  """Regenerates the last T/2 frames of `videos` [b, N, H, W, 3] so that they lead from the frames
  before them into the first frames: one window [N - 3T/4 .. N - T/2 | T/2 new | 0 .. T/4).
  Frames at the indices `keep` (given keyframes) stay."""
  from sora_jax import sample
  n = videos.shape[1]
  T = check_loop(model.config, n, keep)
  new, before = T // 2, T // 4
  after = T - new - before
  window = np.concatenate([videos[:, n - new - before:n - new], videos[:, n - new:], videos[:, :after]], axis=1)
  mask = np.zeros(T, bool)
  mask[:before] = mask[before + new:] = True
  for i in keep:
    i = i + n if i < 0 else i
    if n - new <= i < n:
      mask[before + i - (n - new)] = True
  clips = sample.generate(model, prompts, seed=seed + 7919 * 999, given=window, given_mask=mask,
                          size=window.shape[1:4], **sample_kw)
  return np.concatenate([videos[:, :n - new], clips[:, before:before + new]], axis=1)


def given_frames(frames: int, keyframes: list = (), clip_thwc: np.ndarray | None = None,
                 backward: bool = False) -> tuple[dict, str | None]:
  """({output frame index: uint8 [H, W, 3]}, a note if the clip was cut) for an output of `frames`
  frames: `keyframes` [(image, index)] at their indices (negative: from the end), and a clip that
  the output starts with (backward: ends with). A clip of `frames` frames or more gives its last
  (backward: first) frames // 2 frames."""
  if frames < 1:
    raise UsageError(f'frames={frames}: need at least one frame')
  given, note = {}, None
  if clip_thwc is not None:
    g = len(clip_thwc)
    if g >= frames:
      keep = frames // 2
      if keep < 1:
        raise UsageError(f'extend: an output of {frames} frame(s) leaves no frame to generate')
      clip_thwc = clip_thwc[:keep] if backward else clip_thwc[g - keep:]
      note = (f'{"extend_backward" if backward else "extend"}: the video has {g} frames, the output {frames}: '
              f'keeping its {"first" if backward else "last"} {keep}')
    offset = frames - len(clip_thwc) if backward else 0
    given.update({offset + i: f for i, f in enumerate(clip_thwc)})
  from_clip = set(given)
  for image, index in keyframes:
    i = frame_index(index, frames, 'keyframe')
    if i in given:  # two frames for one place: neither may win silently
      raise UsageError(f'keyframe @{index}: output frame {i} is already given by '
                       f'{"the video" if i in from_clip else "another keyframe"}')
    given[i] = image
  if len(given) >= frames:
    raise UsageError(f'every one of the {frames} output frames is given: nothing to generate')
  return given, note


def keyframes(model, prompts: list, images: list, *, frames: int | None = None, **kw) -> np.ndarray:
  """Videos with `images` [(uint8 [H, W, 3], index)] at their frame indices (negative: from the end):
  image-to-video with one image at 0, interpolation with images at 0 and -1. The output has the images'
  size unless `height`/`width` are given (then the images must have that size: `fit_frames`)."""
  frames = model.config.data.frames if frames is None else frames
  if images and not (kw.get('height') or kw.get('width')):  # the images' own size
    kw.update(height=np.shape(images[0][0])[0], width=np.shape(images[0][0])[1])
  return generate_frames(model, prompts, given_frames(frames, images)[0], frames=frames, **kw)


def extend(model, prompts: list, clip_thwc: np.ndarray, *, frames: int | None = None, backward: bool = False,
           **kw) -> tuple[np.ndarray, str | None]:
  """(videos of `frames` frames that start with the frames of `clip_thwc` and continue them (backward:
  end with them and show what came before), a note if the clip was cut; see `given_frames`). The output
  has the clip's size unless `height`/`width` are given (then the clip must have that size: `fit_frames`)."""
  frames = model.config.data.frames if frames is None else frames
  if not (kw.get('height') or kw.get('width')):  # the clip's own size
    kw.update(height=np.shape(clip_thwc)[1], width=np.shape(clip_thwc)[2])
  given, note = given_frames(frames, clip_thwc=clip_thwc, backward=backward)
  return generate_frames(model, prompts, given, frames=frames, backward=backward, **kw), note


def edit(model, prompts: list, clip_thwc: np.ndarray, *, frames: int | None = None, strength: float | None = None,
         seed: int = 0, **sample_kw) -> tuple[np.ndarray, str | None]:
  """SDEdit: `clip_thwc` noised to level `strength` in (0, 1] (None: the method's default) and denoised
  with `prompts`: layout and motion stay, what the prompt changes changes. `edit_method='flowedit'`
  (with `source_prompts`, the clip's captions) edits by FlowEdit instead (`sample.generate`). Uses the
  clip's first T frames, at the clip's height and width: T is `frames`, else one window (`window_length`:
  the training length, or a native-size model's the clip's own up to its longest); a shorter clip holds
  its last frame (said in the note). A native-size model's window may be the clip's length rounded up to
  whole temporal patches: its last frame is held for the pass and cut from the output again."""
  from sora_jax import sample
  n = len(clip_thwc)
  T = window_length(model.config, n) if frames is None else frames
  if T < 1:
    raise UsageError(f'frames={T}: need at least one frame')
  out_frames = n if frames is None and native_sizes(model.config) and n < T else T
  note = None
  if out_frames != n:
    note = f'edit: the video has {n} frame{"s" if n > 1 else ""}; using {out_frames}' + (
        ' (its last frame held)' if n < out_frames else ' (its first ones)')
  clip_thwc = np.concatenate([clip_thwc, np.repeat(clip_thwc[-1:], max(T - n, 0), 0)])[:T]
  videos = sample.generate(model, prompts, seed=seed, edit=clip_thwc, strength=strength, size=clip_thwc.shape[:3],
                           **sample_kw)
  return videos[:, :out_frames], note
