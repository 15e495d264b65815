"""The video VAE trains here (configs/vae_shapes.py) and a DiT can use it as its autoencoder."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sora_jax import UsageError, optim, train_vae
from sora_jax.models import autoencoder as autoencoder_lib
from sora_jax.models import vae

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import vae_shapes  # noqa: E402


@pytest.fixture
def vae_config(data_dir):
  config = vae_shapes.get_config('tiny')
  config.data.data_dir = data_dir
  return config


@pytest.mark.slow
def test_a_tiny_vae_overfits_one_batch(vae_config, data_dir):
  from tests.test_train import fixed_batch
  config = vae_config
  config.optim.update(learning_rate=5e-3, warmup_steps=3)
  config.total_steps = 15  # +7.9 dB here (5.0 -> 13.0)
  batch = {'video': fixed_batch(config)['video']}
  cfg = train_vae.vae_config(config)
  graphdef, params = nnx.split(vae.VideoVAE(cfg, rngs=nnx.Rngs(0)))
  params = params.to_pure_dict()
  tx = optim.make_optimizer(config.optim, config.total_steps)
  state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params), ema=params)
  step = jax.jit(train_vae.make_train_step(config, graphdef, tx))
  evaluate = jax.jit(train_vae.make_eval_step(graphdef))
  before = float(np.mean(evaluate(state['params'], batch)[0]))
  for _ in range(config.total_steps):
    state, _ = step(state, batch)
  after = float(np.mean(evaluate(state['params'], batch)[0]))
  assert after > before + 6.0, (before, after)  # dB


@pytest.mark.slow
def test_the_vae_config_trains_evaluates_restores_and_serves_a_dit(vae_config, tmp_path):
  workdir = str(tmp_path / 'vae')
  trained = jax.device_get(train_vae.train_and_evaluate(vae_config, workdir))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'eval/psnr' in r] == [2, 4]
  assert all(-1 <= r['eval/ssim'] <= 1 for r in rows if 'eval/psnr' in r)
  assert sorted(os.listdir(os.path.join(workdir, 'samples', '00000004'))) == ['reconstruction_0.gif', 'reconstruction_1.gif']
  restored = train_vae.train_and_evaluate(vae_config, workdir)  # resumes at step 4: nothing left to do
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), trained)
  other = vae_shapes.get_config('tiny')
  other.data.data_dir, other.model.base_dim = vae_config.data.data_dir, 16
  with pytest.raises(UsageError, match='config.model.base_dim=8, this config has 16'):
    train_vae.train_and_evaluate(other, workdir)  # another model in that workdir: refused before anything runs
  ae = autoencoder_lib.make(autoencoder_lib_config(workdir))
  assert ae.channels == 4 and ae.latent_shape(5, 32, 32) == (3, 16, 16)
  x = np.zeros((1, 5, 32, 32, 3), np.float32)
  assert ae.decode(ae.params, ae.encode(ae.params, x)).shape == x.shape
  with pytest.raises(UsageError, match='no config.json'):
    autoencoder_lib.make(autoencoder_lib_config(str(tmp_path)))


def autoencoder_lib_config(path):
  import ml_collections
  return ml_collections.ConfigDict(dict(kind='workdir', path=path))


def test_ssim_matches_a_scipy_reference_and_is_one_for_identical_clips():
  import scipy.ndimage as ndimage
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 2, 24, 20, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)

  def reference(a, b):  # per frame and channel: Gaussian-filtered moments, the 5-pixel border dropped
    a, b = (a.astype(np.float64) + 1) / 2, (b.astype(np.float64) + 1) / 2
    f = lambda v: ndimage.gaussian_filter(v, 1.5, truncate=3.5)[5:-5, 5:-5]  # an 11-tap window
    mx, my = f(a), f(b)
    vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
    return np.mean(((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4)))

  expected = [np.mean([reference(x[i, t, ..., c], y[i, t, ..., c]) for t in range(2) for c in range(3)])
              for i in range(2)]
  np.testing.assert_allclose(np.asarray(train_vae.ssim(x, y)), expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(train_vae.ssim(x, x)), 1.0, rtol=1e-6)
  assert float(train_vae.ssim(x, y)[0]) > float(train_vae.ssim(x, np.clip(2 * y - x, -1, 1))[0])  # more noise


@pytest.mark.slow
def test_the_adversarial_term_starts_at_its_step_and_then_trains_both_networks(vae_config, tmp_path):
  from tests.test_train import fixed_batch
  config = vae_config
  batch = {'video': fixed_batch(config)['video']}
  graphdef, params = nnx.split(vae.VideoVAE(train_vae.vae_config(config), rngs=nnx.Rngs(0)))
  params = params.to_pure_dict()
  tx = optim.make_optimizer(config.optim, config.total_steps)

  def run(weight, steps):
    config.objective.adversarial.update(weight=weight, start_step=2, channels=4)
    state = dict(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params), ema=params)
    disc_graphdef = disc_tx = None
    if weight:
      disc_graphdef, disc = nnx.split(train_vae.discriminator(config, 1))
      disc_tx = train_vae.discriminator_optimizer(config)
      state.update(disc=disc.to_pure_dict(), disc_opt_state=disc_tx.init(disc.to_pure_dict()))
    step = jax.jit(train_vae.make_train_step(config, graphdef, tx, disc_graphdef, disc_tx))
    history = [state]
    for _ in range(steps):
      state, m = step(state, batch)
      history.append(state)
    return history, m

  plain, _ = run(0.0, 3)
  adversarial, last = run(0.5, 3)
  # Steps 0 and 1: before start_step the VAE trains as without the term, D waits. To rounding: the two
  # steps are different programs, and Adam turns a rounding-sized gradient into a step of up to
  # ~1e-6; the term itself would move parameters by up to twice the step size (~1e-3 here).
  same = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # noqa: E731
  for i in (1, 2):
    jax.tree.map(same, adversarial[i]['params'], plain[i]['params'])
    jax.tree.map(np.testing.assert_array_equal, adversarial[i]['disc'], adversarial[0]['disc'])
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
  assert changed(adversarial[3]['disc'], adversarial[2]['disc'])  # step 2: D learns
  assert changed(adversarial[3]['params'], plain[3]['params'])  # and the VAE feels it
  assert {'train/disc_loss', 'train/adversarial', 'train/disc_real', 'train/disc_fake'} <= set(last)

  # The trainer checkpoints the discriminator with the rest and resumes it.
  workdir = str(tmp_path / 'gan')
  trained = jax.device_get(train_vae.train_and_evaluate(config, workdir))
  assert set(trained) == {'step', 'params', 'opt_state', 'ema', 'disc', 'disc_opt_state'}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(train_vae.train_and_evaluate(config, workdir)), trained)
  config.objective.adversarial.weight = 0.0  # resuming that checkpoint without the term: refused, in one line
  with pytest.raises(UsageError, match='was trained with the adversarial term') as e:
    train_vae.train_and_evaluate(config, workdir)
  assert '\n' not in str(e.value)
  config.objective.adversarial.update(weight=0.5, start_step=-1)
  with pytest.raises(UsageError, match='adversarial.start_step=-1'):
    train_vae.validate_config(config, 1)
