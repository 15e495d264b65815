r"""Image and video prompting of a `shapes` model, judged analytically: one JSON line of per-mode scores.

  python experiments/eval_prompting.py --workdir=runs/shapes [--cases=100] [--seed=0]

Inputs are clips rendered here (`shapes.render_clip`, attributes, start and speed drawn from
--seed, which is not the dataset's), so the model has never seen them. Per mode, a case is right when:

  image_to_video  given frame 0 and a caption with any direction: the generated frames in the
                  image's color, moving as prompted at a constant speed (centroids within
                  --max_error_px of a straight line). Given frames come back unchanged by
                  construction: `exact_given` checks it for every mode;
  extend          given frames [0, T/2): the rest follows the true continuation (mean centroid error
                  <= --max_error_px) in the clip's color;
  extend_backward given frames [T/2, T): the frames before follow the true path, likewise;
  interpolate     given the first and last frames: the frames between follow the true path;
  edit            SDEdit (or --edit_method=flowedit, averaging --flowedit_noise_draws noises a step) of the
                  clip at --strength to a caption of another color: that color, and the clip's path
                  (centroid error <= --max_error_px).
  `*_error_px`: the median path error (image_to_video: distance from a straight line);
  `*_speed_ratio` (extend, extend_backward): the median speed of the generated frames over the true
  speed (centroid velocity fitted over those frames; < 1: the model slows the object down);
  `*_speed_slope`: the least-squares slope of generated against true speed over the cases (1: the
  model reads the speed off the given frames; 0: it ignores them and moves every object alike).
"""

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

from sora_jax import UsageError, init_devices, metrics, quiet_library_logs, video
from sora_jax.data import shapes
from sora_jax.eval import adherence

flags.DEFINE_string('workdir', None, 'Training workdir (a frame-conditioned shapes model).')
flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_integer('cases', 100, 'Cases per mode.')
flags.DEFINE_integer('seed', 0, 'Seed of the rendered inputs and of the sampling noise.')
flags.DEFINE_integer('batch', 50, 'Cases per sampling call.')
flags.DEFINE_float('strength', None, 'Noise level of the edit mode (default: 0.7 for sdedit, 0.85 for flowedit).')
flags.DEFINE_enum('edit_method', 'sdedit', ('sdedit', 'flowedit'), 'How the edit mode edits (sample.generate); '
                  "flowedit is given the clip's caption as its source prompt.")
flags.DEFINE_integer('flowedit_noise_draws', None, 'With --edit_method=flowedit: noises averaged a step '
                     '(default: sample.FLOWEDIT_NOISE_DRAWS).')
flags.DEFINE_float('max_error_px', 1.5, 'Largest mean centroid error (pixels) of a right path.')
flags.DEFINE_float('guidance_scale', None, 'Text guidance scale (default: config; edits: sample.edit_settings).')
flags.DEFINE_float('frame_guidance_scale', None, 'Guidance toward given frames (default: config).')
flags.DEFINE_float('reconstruction_guidance', None, 'Reconstruction guidance with given frames (default: the '
                   "config's, as sampling: extension_reconstruction_guidance for extend / extend_backward).")
flags.DEFINE_integer('steps', None, 'Sampling steps (default: config).')
flags.DEFINE_float('stochasticity', None, 'Fresh noise per sampling step in [0, 1] (default: config).')
flags.DEFINE_float('time_shift', None, 'Sampling time shift (> 1: more steps at high noise; default: config).')
flags.DEFINE_string('out_dir', None, 'If set, write the first batch of each mode here as GIFs (input | output).')
flags.DEFINE_string('modes', 'image_to_video,extend,extend_backward,interpolate,edit', 'Comma-separated modes.')
FLAGS = flags.FLAGS
MODES = ('image_to_video', 'extend', 'extend_backward', 'interpolate', 'edit')


def random_case(rng: np.random.Generator, cfg) -> dict:
  d = cfg.data
  return shapes.random_clip(rng, frames=d.frames, height=d.height, width=d.width, object_size=d.object_size)


def main(argv):
  del argv
  quiet_library_logs()  # Orbax's INFO lines: only the JSON result matters here
  init_devices()
  from sora_jax import sample
  try:
    if not FLAGS.workdir:
      raise UsageError('--workdir is required')
    if FLAGS.flowedit_noise_draws is not None and FLAGS.edit_method != 'flowedit':
      raise UsageError('--flowedit_noise_draws goes with --edit_method=flowedit')
    modes = FLAGS.modes.split(',')
    if set(modes) - set(MODES):
      raise UsageError(f'--modes: unknown {sorted(set(modes) - set(MODES))}; use {MODES}')
    model = sample.load(FLAGS.workdir, FLAGS.checkpoint_step)
    cfg = model.config
    T = cfg.data.frames
    kw = dict(num_steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale,
              frame_guidance_scale=FLAGS.frame_guidance_scale, stochasticity=FLAGS.stochasticity,
              reconstruction_guidance=FLAGS.reconstruction_guidance,
              time_shift=FLAGS.time_shift)
    strength, edit_guidance = sample.edit_settings(FLAGS.edit_method, FLAGS.strength, FLAGS.guidance_scale)
    rng = np.random.default_rng(FLAGS.seed + 10_000)  # not the dataset's seeds
    result = dict(workdir=FLAGS.workdir, step=model.step, cases=FLAGS.cases, max_error_px=FLAGS.max_error_px)
    start = time.time()
    exact = []
    batches, done = len(modes) * -(-FLAGS.cases // FLAGS.batch), 0
    for mode in modes:
      right, errors, speed_ratios, speeds = [], [], [], []
      for first in range(0, FLAGS.cases, FLAGS.batch):
        cases = [random_case(rng, cfg) for _ in range(min(FLAGS.batch, FLAGS.cases - first))]
        clips = np.stack([c['video'] for c in cases])
        seed = FLAGS.seed * 1000 + first
        if mode == 'image_to_video':
          prompts = [shapes.caption(shapes.COLOR_NAMES[c['color']], shapes.SHAPES[c['shape']],
                                    shapes.DIRECTION_NAMES[int(rng.integers(4))]) for c in cases]
          given = np.zeros(T, bool)
          given[0] = True
          videos = sample.generate(model, prompts, given=clips, given_mask=given, seed=seed, **kw)
          errs = [adherence.linear_motion_error(v) for v in videos]
          errors.extend(errs)
          judged = [e <= FLAGS.max_error_px and adherence.judge_color(v[1:]) == shapes.parse_caption(p)[0] and
                    adherence.judge_direction(v) == shapes.parse_caption(p)[2]
                    for e, v, p in zip(errs, videos, prompts)]
          exact.append(bool((videos[:, 0] == clips[:, 0]).all()))
        elif mode in ('extend', 'extend_backward', 'interpolate'):
          prompts = [c['caption'] for c in cases]
          given = np.zeros(T, bool)
          if mode == 'extend':
            given[:T // 2] = True
          elif mode == 'extend_backward':
            given[T // 2:] = True
          else:
            given[[0, -1]] = True
          videos = sample.generate(model, prompts, given=clips, given_mask=given, seed=seed, **kw)
          exact.append(bool((videos[:, given] == clips[:, given]).all()))
          errs = [adherence.path_error(v, c, ~given) for v, c in zip(videos, clips)]
          errors.extend(errs)
          if mode != 'interpolate':
            speeds.extend((adherence.speed(c, ~given), adherence.speed(v, ~given)) for v, c in zip(videos, clips))
            speed_ratios.extend(generated / true for true, generated in speeds[-len(cases):])
          judged = [e <= FLAGS.max_error_px and adherence.judge_color(v[~given]) == shapes.parse_caption(p)[0]
                    for e, v, p in zip(errs, videos, prompts)]
        else:  # edit: another color, the same shape and direction
          colors = shapes.COLOR_NAMES
          prompts = []
          for c in cases:
            color, shape, direction = shapes.parse_caption(c['caption'])
            other = [x for x in colors if x != color]
            prompts.append(shapes.caption(other[int(rng.integers(len(other)))], shape, direction))
          flowedit = FLAGS.edit_method == 'flowedit'
          source = [c['caption'] for c in cases] if flowedit else None
          draws = dict(flowedit_noise_draws=FLAGS.flowedit_noise_draws) if flowedit else {}
          videos = sample.generate(model, prompts, edit=clips, strength=strength, seed=seed,
                                   edit_method=FLAGS.edit_method, source_prompts=source, **draws, **kw)
          errs = [adherence.path_error(v, c, np.ones(T, bool)) for v, c in zip(videos, clips)]
          errors.extend(errs)
          judged = [e <= FLAGS.max_error_px and adherence.judge_color(v) == shapes.parse_caption(p)[0]
                    for e, v, p in zip(errs, videos, prompts)]
        right.extend(judged)
        done += 1  # progress on stderr (stdout is the JSON line); the ETA at the pace so far
        elapsed = time.time() - start
        print(f'{mode}: {len(right)}/{FLAGS.cases} cases, {np.mean(right):.2f} right | {elapsed:.0f} s, '
              f'ETA {metrics.format_eta(elapsed / done * (batches - done))}', file=sys.stderr, flush=True)
        if FLAGS.out_dir and first == 0:
          for i, (v, c, p, ok) in enumerate(zip(videos, clips, prompts, judged)):
            name = f'{mode}_{i:03d}_{"right" if ok else "wrong"}_{p.replace(" ", "_")}.gif'
            video.write(os.path.join(FLAGS.out_dir, name), np.concatenate([c, v], axis=2), upscale=2)
      result[mode] = round(float(np.mean(right)), 3)
      if errors:
        finite = [e for e in errors if np.isfinite(e)]
        result[f'{mode}_error_px'] = round(float(np.median(finite)), 2) if finite else None
      if np.isfinite(speed_ratios).any():
        result[f'{mode}_speed_ratio'] = round(float(np.nanmedian(speed_ratios)), 3)
        true, generated = np.array([p for p in speeds if np.isfinite(p).all()]).T
        if len(true) > 1 and np.ptp(true) > 0:
          result[f'{mode}_speed_slope'] = round(float(np.polyfit(true, generated, 1)[0]), 3)
    result.update(exact_given=all(exact), seconds=round(time.time() - start, 1), strength=strength,
                  edit_method=FLAGS.edit_method, edit_guidance_scale=edit_guidance,
                  flowedit_noise_draws=(FLAGS.flowedit_noise_draws or sample.FLOWEDIT_NOISE_DRAWS
                                        if FLAGS.edit_method == 'flowedit' else None),
                  guidance_scale=FLAGS.guidance_scale, frame_guidance_scale=FLAGS.frame_guidance_scale,
                  reconstruction_guidance=FLAGS.reconstruction_guidance,
                  stochasticity=FLAGS.stochasticity, steps=FLAGS.steps,
                  time_shift=FLAGS.time_shift)
    print(json.dumps(result))
  except UsageError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
