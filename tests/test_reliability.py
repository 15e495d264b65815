"""Preemption, non-finite steps and mismatched workdirs lose nothing."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import UsageError, optim, sharding, train
from sora_jax.models import autoencoder as autoencoder_lib
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PoisonedAutoencoder(autoencoder_lib.Identity):
  def encode(self, params, video):
    return video * jnp.nan


def test_a_nonfinite_step_leaves_params_moments_and_ema_unchanged(tiny_config):
  from tests.test_train import fixed_batch
  config = tiny_config
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, _, shardings = train.state_shardings(config, mesh, tx)
  state = train.create_state(config, 3, tx, shardings)
  step = jax.jit(train.make_train_step(config, graphdef, tx, PoisonedAutoencoder()))
  batch = fixed_batch(config)
  new_state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, {'autoencoder': {}})
  assert float(metrics['train/skipped_nonfinite']) == 1.0
  assert int(new_state['step']) == int(state['step']) + 1
  for key in ('params', 'opt_state', 'ema'):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state[key]), jax.device_get(state[key]))


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_the_run_with_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  config = tiny_config
  config.sample.prompts = ()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)  # a good run to step 4
  config.total_steps, config.max_consecutive_nonfinite = 12, 3
  monkeypatch.setattr(autoencoder_lib.Identity, 'encode', PoisonedAutoencoder.encode)
  with pytest.raises(train.NonFiniteError, match=r'3 consecutive non-finite steps up to step 7 .*step 6'):
    train.train_and_evaluate(config, workdir)
  # Checkpoints taken during the streak (step 6) hold the unchanged, finite state.
  from sora_jax import checkpoint, sample
  for step in checkpoint.manager(workdir, read_only=True).all_steps():
    params = sample.load(workdir, step).params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


@pytest.mark.slow
def test_a_preempted_or_crashed_run_resumes_to_the_uninterrupted_result_bit_for_bit(tiny_config, tmp_path, monkeypatch):
  from tests.test_train import assert_same_state, read_metrics, train_rows
  config = tiny_config
  config.sample.prompts = ()
  config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 6, 1, 4
  full = str(tmp_path / 'full')
  state_full = train.train_and_evaluate(config, full)
  workdir = str(tmp_path / 'preempted')
  with monkeypatch.context() as m:  # as if SIGTERM arrived during step 3
    m.setattr(train.StopSignal, 'should_stop', lambda self, step: step == 3)
    stopped = train.train_and_evaluate(config, workdir)
  assert int(stopped['step']) == 3
  resumed = train.train_and_evaluate(config, workdir)
  assert train_rows(workdir) == train_rows(full)  # losses, norms, lr: all equal
  assert_same_state(resumed, state_full)

  # A run that crashed after logging step 6 but before its step-6 checkpoint was committed: it
  # resumes at step 4, and steps 5 and 6 are trained again, their old rows replaced, not duplicated.
  crashed = str(tmp_path / 'crashed')
  shutil.copytree(full, crashed)
  shutil.rmtree(os.path.join(crashed, 'checkpoints', '6'))
  assert_same_state(train.train_and_evaluate(config, crashed), state_full)  # params, moments, EMA, step
  assert [r['step'] for r in read_metrics(crashed)] == [1, 2, 3, 4, 5, 6]
  assert train_rows(crashed) == train_rows(full)


@pytest.mark.slow
def test_resuming_with_another_model_config_is_refused_unless_overwrite(tiny_config, tmp_path):
  config = tiny_config
  config.sample.prompts = ()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  config.model.width = 64
  with pytest.raises(UsageError, match='config.model.width=32, this config has 64') as e:
    train.train_and_evaluate(config, workdir)
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']  # untouched
  config.total_steps = 2
  state = train.train_and_evaluate(config, workdir, overwrite=True)
  assert int(state['step']) == 2 and state['params']['final']['proj']['kernel'].shape[0] == 64
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [2]


def test_an_unwritable_workdir_is_a_one_line_error(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(UsageError, match='--workdir=.*a_file/run'):
    train.prepare_workdir(str(blocker / 'run'), overwrite=False)


def test_a_checkpoint_from_8_devices_restores_onto_4_and_1_and_back(tiny_config, tmp_path):
  from sora_jax import checkpoint
  config = tiny_config
  tx = optim.make_optimizer(config.optim, config.total_steps)

  def abstract_on(n, **mesh):
    config.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1) | mesh)
    m = sharding.make_mesh(config.mesh, jax.devices()[:n])
    return train.state_shardings(config, m, tx)[1:]

  abstract8, shardings8 = abstract_on(8, fsdp=4, tensor=2)
  state = train.create_state(config, 3, tx, shardings8)
  mngr = checkpoint.manager(str(tmp_path / 'a'))
  checkpoint.save(mngr, 1, state)
  mngr.wait_until_finished()
  expected = jax.device_get(state)
  for n, mesh in ((4, dict(fsdp=4)), (1, dict())):
    abstract, shardings = abstract_on(n, **mesh)
    restored = checkpoint.restore(mngr, 1, abstract)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
    kernel = restored['params']['blocks'][0]['mlp']['fc1']['kernel']
    assert len(kernel.sharding.device_set) == n
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // (4 if n == 4 else 1)
  # ... and a 1-device checkpoint back onto 8 devices.
  mngr1 = checkpoint.manager(str(tmp_path / 'b'))
  checkpoint.save(mngr1, 1, restored)
  mngr1.wait_until_finished()
  back = checkpoint.restore(mngr1, 1, abstract8)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), expected)


def test_saving_a_replicated_state_on_cpu_compiles_nothing(tmp_path):
  """Replica-parallel writes slice each replicated array per replica, a compile per slice shape:
  on CPU that only costs time (seconds on the tiny config), so the manager turns it off."""
  from sora_jax import checkpoint
  mesh = jax.make_mesh((8,), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {k: {'w': jax.device_put(jnp.ones(shape), replicated)} for k, shape in
           (('step', ()), ('params', (40, 24)), ('opt_state', (40, 24)), ('ema', (24, 17)))}
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if 'backend_compile' in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    mngr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mngr, 1, state)
    mngr.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []
  restored = checkpoint.restore(mngr, 1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                                      sharding=x.sharding), state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))


@pytest.mark.slow
def test_sigkill_during_checkpointing_leaves_a_resumable_workdir(data_dir, tmp_path):
  from sora_jax import checkpoint, sample
  workdir = str(tmp_path / 'run')
  env = subprocess_env(2)
  base = [sys.executable, '-m', 'sora_jax.main', '--config=configs/shapes.py:tiny', f'--workdir={workdir}',
          f'--config.data.data_dir={data_dir}', '--config.checkpoint_every_steps=1',
          '--config.log_every_steps=1', '--config.max_checkpoints_to_keep=2']
  rng = np.random.default_rng(0)
  latest = 0
  for attempt in range(2):
    proc = subprocess.Popen(base + ['--config.total_steps=100000'], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # a few steps past where this attempt started, each one saving
      logged = re.search(r'step (\d+)/', line)
      if logged and int(logged.group(1)) >= latest + 3:
        break
    time.sleep(float(rng.uniform(0.0, 0.3)))  # somewhere inside an async save
    proc.kill()
    proc.wait()
    previous, latest = latest, checkpoint.manager(workdir, read_only=True).latest_step()
    # Saves still committing when the kill came are lost, never the committed ones.
    assert latest is not None and latest >= max(previous, 1)
    # The latest step is a complete checkpoint, whatever half-written one the kill left behind.
    params = sample.load(workdir).params
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))
  result = subprocess.run(base + [f'--config.total_steps={latest + 1}', '--config.sample.num_steps=1'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'at step {latest}' in result.stderr
