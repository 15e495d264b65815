r"""Prompt adherence and FVD of a `shapes` model, in one JSON line.

  python experiments/eval_shapes.py --workdir=runs/shapes [--seeds=2] [--guidance_scale=3]

Samples every caption (7 colors x 3 shapes x 4 directions = 84) once per seed with the EMA
parameters and judges each video analytically (`sora_jax.eval.adherence`: color, direction,
shape, all; `shape_circle` etc. per asked shape, `color_red` etc. per asked color, which shows a
mix-up by name) and by the shapes classifier's heads (`learned_*`). `fvd` compares the samples with
the validation clips through the classifier's features (`sora_jax.eval.classifier`, trained and
cached on first use); `--i3d_path` adds
`fvd_i3d` through a Kinetics-400 I3D (clips of 9+ frames). FVD depends on the sample count: compare
runs at the same --seeds. Seeds start at 1000, away from the seed of the training-time samples
(`--first_seed`). `--ground_truth` scores validation clips instead, which checks the judge itself
(it should print 1.0 everywhere).

`--size=FxHxW` (native-size models) samples at that size and judges analytically and by a
classifier trained for that size (`learned_*`; `learned_judge_on_truth`: its accuracy on 252 clips
rendered at that size), without FVD. The two judges disagree on ragged squares: the analytic one
needs a fill ratio of 0.89, which a square with blunted corners misses.
"""

import itertools
import json
import os
import sys
import time

import numpy as np
from absl import app, flags

from sora_jax import UsageError, init_devices, metrics, quiet_library_logs, video
from sora_jax.data import shapes
from sora_jax.eval import adherence, classifier, fvd

flags.DEFINE_string('workdir', None, 'Training workdir.')
flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_enum('params', 'ema', ('ema', 'raw'), 'Sample with the EMA parameters or the raw (not averaged) ones.')
flags.DEFINE_integer('seeds', 1, 'Samples per caption.')
flags.DEFINE_integer('first_seed', 1000, 'Noise seeds are first_seed, first_seed + 1, ...')
flags.DEFINE_integer('batch', 42, 'Prompts per sampling call.')
flags.DEFINE_float('guidance_scale', None, 'Guidance scale (default: config).')
flags.DEFINE_integer('steps', None, 'Sampling steps (default: config).')
flags.DEFINE_float('stochasticity', None, 'Share of fresh noise per sampling step (default: config).')
flags.DEFINE_float('time_shift', None, 'Sampling time shift; < 1 spends more steps near the clean end '
                   '(default: config).')
flags.DEFINE_string('out_dir', None, 'If set, also write every sample here as a GIF.')
flags.DEFINE_bool('ground_truth', False, 'Score validation clips instead of samples.')
flags.DEFINE_string('size', None, 'Sample at FRAMESxHEIGHTxWIDTH, e.g. 16x32x56 (native-size models): adherence, '
                    'analytic and by a classifier trained for that size (no FVD); one frame (an image): image '
                    'captions, color and shape.')
flags.DEFINE_string('i3d_path', None, 'Also FVD through this I3D checkpoint (piergiaj .pt or converted .npz).')
FLAGS = flags.FLAGS


def all_captions(images: bool = False) -> list[str]:
  if images:  # 7 colors x 3 shapes, no motion
    return [shapes.caption(c, s, None) for c, s in itertools.product(shapes.COLORS, shapes.SHAPES)]
  return [shapes.caption(c, s, d) for c, s, d in
          itertools.product(shapes.COLORS, shapes.SHAPES, shapes.DIRECTIONS)]


def judge_on_truth(clf, size, object_size: int, n: int = 252) -> dict:
  """The classifier's accuracy on `n` freshly rendered clips of `size` (a seed of its own): how far
  its `learned_*` scores can be trusted."""
  rng = np.random.default_rng(4321)
  clips = [shapes.random_clip(rng, frames=size[0], height=size[1], width=size[2], object_size=object_size,
                              image_captions=True) for _ in range(n)]
  scores = clf.adherence([c['video'] for c in clips], [c['caption'] for c in clips])
  return {k: round(v, 3) for k, v in scores.items()}


def main(argv):
  del argv
  quiet_library_logs()  # Orbax's INFO lines: only the JSON result matters here
  init_devices()
  from sora_jax import sample  # after flag parsing: importing jax early is harmless but slow
  try:
    if not FLAGS.workdir:
      raise UsageError('--workdir is required')
    size = None
    if FLAGS.size:
      try:
        (size,) = shapes.parse_sizes(FLAGS.size)
      except (UsageError, ValueError):
        raise UsageError(f'--size={FLAGS.size}: give one FRAMESxHEIGHTxWIDTH, e.g. 16x32x56') from None
    model = sample.load(FLAGS.workdir, FLAGS.checkpoint_step, FLAGS.params)
    start = time.time()
    if FLAGS.ground_truth:
      from sora_jax.data import pipeline
      source = pipeline.data_source(model.config.data, 'validation')
      videos = [source[i]['video'] for i in range(len(source))]
      prompts = [source[i]['caption'].decode() for i in range(len(source))]
    else:
      prompts, videos = [], []
      captions = all_captions(images=size is not None and size[0] == 1)
      total = FLAGS.seeds * len(captions)
      for seed in range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.seeds):
        for i in range(0, len(captions), FLAGS.batch):
          chunk = captions[i:i + FLAGS.batch]
          videos.extend(sample.generate(model, chunk, seed=seed * 100 + i, num_steps=FLAGS.steps,
                                        guidance_scale=FLAGS.guidance_scale, time_shift=FLAGS.time_shift,
                                        stochasticity=FLAGS.stochasticity, size=size))
          prompts.extend(chunk)
          elapsed = time.time() - start  # progress on stderr (stdout is the JSON line)
          eta = elapsed / len(videos) * (total - len(videos))
          print(f'{len(videos)}/{total} videos | {elapsed:.0f} s, ETA {metrics.format_eta(eta)}', file=sys.stderr,
                flush=True)
    if FLAGS.out_dir:
      for i, (p, v) in enumerate(zip(prompts, videos)):
        video.write(os.path.join(FLAGS.out_dir, f'{i:04d}_{p.replace(" ", "_")}.gif'), v)
    result = adherence.score(videos, prompts)
    if size is not None:  # the validation clips have the config's size: no FVD
      # A second judge: the shapes classifier trained for this size, and its accuracy on fresh clips.
      clf = classifier.load_or_train(*size, object_size=model.config.data.object_size)
      result.update({f'learned_{k}': v for k, v in clf.adherence(videos, prompts).items()})
      result['learned_judge_on_truth'] = judge_on_truth(clf, size, model.config.data.object_size)
      result.update(size=list(size), workdir=FLAGS.workdir, step=model.step, seconds=round(time.time() - start, 1),
                    exact_size=all(v.shape == (*size, 3) for v in videos))
      print(json.dumps(result))
      return
    from sora_jax.data import pipeline
    source = pipeline.data_source(model.config.data, 'validation')
    real = [source[i]['video'] for i in range(len(source))]
    clf = classifier.for_data(model.config.data)
    result.update({f'learned_{k}': v for k, v in clf.adherence(videos, prompts).items()})
    result['fvd'] = round(fvd.fvd(clf.features, real, videos), 3)
    result['fvd_real_videos'] = len(real)
    if FLAGS.i3d_path:
      from sora_jax.eval import i3d
      result['fvd_i3d'] = round(fvd.fvd(i3d.load(FLAGS.i3d_path), real, videos, batch_size=16), 3)
    result.update(workdir=FLAGS.workdir, step=model.step, seconds=round(time.time() - start, 1),
                  guidance_scale=FLAGS.guidance_scale, steps=FLAGS.steps, time_shift=FLAGS.time_shift,
                  stochasticity=FLAGS.stochasticity)
    print(json.dumps(result))
  except UsageError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
