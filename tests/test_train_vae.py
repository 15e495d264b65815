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


def test_a_tiny_vae_overfits_one_batch(vae_config, data_dir):
  from tests.test_train import fixed_batch
  config = vae_config
  config.optim.update(learning_rate=5e-3, warmup_steps=3)
  config.total_steps = 30
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


def test_the_vae_config_trains_evaluates_restores_and_serves_a_dit(vae_config, tmp_path):
  workdir = str(tmp_path / 'vae')
  trained = jax.device_get(train_vae.train_and_evaluate(vae_config, workdir))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows if 'eval/psnr' in r] == [2, 4]
  assert sorted(os.listdir(os.path.join(workdir, 'samples', '00000004'))) == ['reconstruction_0.gif', 'reconstruction_1.gif']
  restored = train_vae.train_and_evaluate(vae_config, workdir)  # resumes at step 4: nothing left to do
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), trained)
  ae = autoencoder_lib.make(autoencoder_lib_config(workdir))
  assert ae.channels == 4 and ae.latent_shape(5, 32, 32) == (3, 16, 16)
  x = np.zeros((1, 5, 32, 32, 3), np.float32)
  assert ae.decode(ae.params, ae.encode(ae.params, x)).shape == x.shape
  with pytest.raises(UsageError, match='no config.json'):
    autoencoder_lib.make(autoencoder_lib_config(str(tmp_path)))


def autoencoder_lib_config(path):
  import ml_collections
  return ml_collections.ConfigDict(dict(kind='workdir', path=path))
