r"""Does a frame-conditioned shapes model read the speed off the given frames? One JSON line.

  python experiments/extension_probe.py --workdir=runs/shapes [--cases=64] [--noise_levels=1,0.9,0.7,0.5,0.3]

Forward extension cases (frames [0, T/2) given clean, rendered here from their own seed) are noised
to each level t on the generated frames, and the model predicts them once (its x0 estimate, with the
caption; no sampler, no guidance). Per level: `speed_slope`, the least-squares slope of the predicted
speed against the true one over the cases (the speed of the brightness centroid of the prediction,
which at high t is a blur whose centroid is where the model expects the object: 1 = it reads the
speed off the given frames, 0 = every object moves alike), `path_error_px` (median over cases of the
mean centroid distance from the true path) and `right` (the share within --max_error_px, as in
experiments/eval_prompting.py). At t = 1 the generated frames are pure noise, so only the given frames
can tell the model where the object goes: that is where sampling settles the path.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from sora_jax import UsageError, init_devices, quiet_library_logs
from sora_jax.data import shapes
from sora_jax.diffusion import frame_conditioning as fc
from sora_jax.diffusion import rectified_flow as rf
from sora_jax.eval import adherence

flags.DEFINE_string('workdir', None, 'Training workdir (a frame-conditioned, pixel-space shapes model).')
flags.DEFINE_integer('checkpoint_step', None, 'Checkpoint step (default: latest).')
flags.DEFINE_integer('cases', 64, 'Extension cases.')
flags.DEFINE_integer('seed', 0, 'Seed of the rendered cases and of the noise.')
flags.DEFINE_string('noise_levels', '1,0.9,0.7,0.5,0.3', 'Comma-separated noise levels t in (0, 1].')
flags.DEFINE_float('max_error_px', 1.5, 'Largest mean centroid error (pixels) of a right path.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_library_logs()  # Orbax's INFO lines: only the JSON result matters here
  init_devices()
  from sora_jax import sample
  try:
    if not FLAGS.workdir:
      raise UsageError('--workdir is required')
    levels = [float(v) for v in FLAGS.noise_levels.split(',')]
    if not all(0 < t <= 1 for t in levels):
      raise UsageError(f'--noise_levels={FLAGS.noise_levels}: each must be in (0, 1]')
    model = sample.load(FLAGS.workdir, FLAGS.checkpoint_step)
    cfg = model.config
    if cfg.autoencoder.kind != 'identity' or not cfg.model.get('frame_conditioning', False):
      raise UsageError(f'{FLAGS.workdir}: needs a pixel-space model trained with frame conditioning')
  except UsageError as e:
    raise SystemExit(f'error: {e}') from None
  T, n = cfg.data.frames, FLAGS.cases
  rng = np.random.default_rng(FLAGS.seed + 20_000)  # neither the dataset's nor eval_prompting's cases
  cases = [shapes.random_clip(rng, frames=T, height=cfg.data.height, width=cfg.data.width,
                              object_size=cfg.data.object_size) for _ in range(n)]
  clips = np.stack([c['video'] for c in cases])
  x0 = jnp.asarray(clips, jnp.float32) / 127.5 - 1.0
  given = np.zeros(T, bool)
  given[:T // 2] = True
  mask_bt = jnp.asarray(np.broadcast_to(given, (n, T)))
  cond, _ = sample.conditioning(cfg, [c['caption'] for c in cases], model.text_encoder)
  net = nnx.merge(model.graphdef, model.params)
  predict = jax.jit(lambda x, t: net(x, t, **cond, frame_mask_bt=mask_bt))
  noise = jax.random.normal(jax.random.key(FLAGS.seed), x0.shape)
  true_speed = np.array([adherence.speed(c, ~given) for c in clips])
  true_path = np.stack([adherence.centroids(c) for c in clips])[:, ~given]
  frames = np.flatnonzero(~given).astype(float)
  result = dict(workdir=FLAGS.workdir, step=model.step, cases=n)
  for t in levels:
    t_b = jnp.full((n,), t)
    x_t = fc.apply_to_input(rf.interpolate(x0, noise, t_b), x0, mask_bt)
    x0_hat = x_t - t * rf.to_velocity(predict(x_t, t_b), x_t, t_b, prediction_type=cfg.objective.prediction)
    path = adherence.soft_centroids(x0_hat)[:, ~given]
    speed = np.array([np.linalg.norm(np.polyfit(frames - frames.mean(), p, 1)[0]) for p in path])
    error = np.linalg.norm(path - true_path, axis=-1).mean(1)
    result[f't={t:g}'] = dict(speed_slope=round(float(np.polyfit(true_speed, speed, 1)[0]), 3),
                              path_error_px=round(float(np.median(error)), 2),
                              right=round(float(np.mean(error <= FLAGS.max_error_px)), 3))
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
