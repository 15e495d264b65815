import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from jax.sharding import PartitionSpec as P

from sora_jax import UsageError, optim, sharding, train
from sora_jax.data import pipeline


def fixed_batch(config, count=8, seed=0):
  source = pipeline.data_source(config.data, 'train')
  it = pipeline.make_iterator(source, global_batch_size=count, seed=seed, max_text_len=config.data.max_text_len)
  return next(it)


def setup_step(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_tuple(config.sharding_rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, abstract, shardings = train.state_shardings(config, mesh, tx)
  ae = train.sample.abstract_model(config)[2]
  batch_sh = {k: sharding.batch_sharding(mesh, nd, rules) for k, nd in train.batch_ndims(config).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = train.create_state(config, ae.channels, tx, shardings)
    step = jax.jit(train.make_train_step(config, graphdef, tx, ae), in_shardings=(shardings, batch_sh, {'autoencoder': {}}),
                   out_shardings=(shardings, sharding.replicated(mesh)))
  return mesh, rules, state, step, batch_sh


_ONE_DEVICE = {}  # reference runs shared by the parametrized cases of a worker


def one_device_reference(config, batch, steps):
  """`run_steps` on one device, computed once per config (the sharded cases compare to it)."""
  key = (config.to_json_best_effort(), steps)
  if key not in _ONE_DEVICE:
    _ONE_DEVICE[key] = run_steps(config, jax.devices()[:1], batch, steps)
  return _ONE_DEVICE[key]


def run_steps(config, devices, batch, steps):
  mesh, rules, state, step, batch_sh = setup_step(config, devices)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(steps):
      b = {k: jax.device_put(batch[k], batch_sh[k]) for k in batch_sh}
      state, m = step(state, b, {'autoencoder': {}})
      losses.append(float(m['train/loss']))
  return state, losses


def test_a_tiny_model_overfits_one_batch(tiny_config):
  config = tiny_config
  config.optim.learning_rate, config.optim.warmup_steps = 3e-3, 5
  config.total_steps = 60
  config.objective.high_noise_fraction = 0.0
  batch = fixed_batch(config)
  _, losses = run_steps(config, jax.devices()[:1], batch, 60)
  assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses


def test_sharded_step_on_data_fsdp_tensor_mesh_with_accumulation_and_remat_matches_one_device(tiny_config):
  """The plain sharded step (no accumulation, no remat) is the mesh presets' test below."""
  config = tiny_config
  config.model.update(width=32, num_heads=4, text_heads=2)
  batch = fixed_batch(config)
  single, losses1 = one_device_reference(config, batch, 2)
  config.mesh.update(data=2, fsdp=2, tensor=2, sequence=1)
  config.grad_accum_steps, config.model.remat = 2, 'dots'  # micro-batches of 4 over data x fsdp = 4
  sharded, losses8 = run_steps(config, jax.devices()[:8], batch, 2)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               jax.device_get(sharded['params']), jax.device_get(single['params']))
  # The parameters really are sharded by the rules: embed -> fsdp, heads/mlp -> tensor.
  block = sharded['params']['blocks'][0]
  assert block['self_attn']['wq'].sharding.spec == P('fsdp', 'tensor', None)
  assert block['mlp']['fc1']['kernel'].sharding.spec == P('fsdp', 'tensor')
  assert block['mlp']['fc1']['kernel'].addressable_shards[0].data.shape == (16, 64)
  # Adam moments and EMA are sharded like their parameters.
  mu = sharded['opt_state'][1][0].mu['blocks'][0]['mlp']['fc1']['kernel']
  assert mu.sharding.spec == P('fsdp', 'tensor')
  assert sharded['ema']['blocks'][0]['mlp']['fc1']['kernel'].sharding.spec == P('fsdp', 'tensor')


# Each sequence-parallel mode alone is checked against plain attention in tests/test_layers.py.
@pytest.mark.parametrize('mesh, sequence_parallel', [
    ('dp', 'all_to_all'), ('fsdp_tp', 'all_to_all'), ('fsdp_tp_sp', 'all_to_all'),
    ('data=2,sequence=4', 'gather_kv')])  # fsdp (with accumulation, remat): test_sharded_step_on_data_fsdp_tensor_mesh_with...
def test_every_mesh_preset_and_sequence_parallelism_match_one_device(tiny_config, mesh, sequence_parallel):
  """Spacetime tokens sharded over 'sequence' too, with each way of communicating for attention."""
  config = tiny_config
  config.model.update(width=32, num_heads=4, text_heads=2)
  batch = fixed_batch(config)
  single, losses1 = one_device_reference(config, batch, 2)
  config.model.sequence_parallel = sequence_parallel
  sizes = sharding.MESH_PRESETS.get(mesh) or dict(data=2, fsdp=1, tensor=1, sequence=4)
  config.mesh.update(sizes)
  sharded, losses8 = run_steps(config, jax.devices()[:8], batch, 2)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               jax.device_get(sharded['params']), jax.device_get(single['params']))


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_rows(workdir):
  """The metrics.jsonl rows without the timing columns, which differ between runs."""
  return [{k: v for k, v in row.items() if not k.startswith('perf/')} for row in read_metrics(workdir)]


def assert_same_state(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_checkpoint_round_trip_restores_every_array(tiny_config, tmp_path):
  from sora_jax import checkpoint
  config = tiny_config
  mesh = sharding.make_mesh(config.mesh)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  _, abstract, shardings = train.state_shardings(config, mesh, tx)
  state = train.create_state(config, 3, tx, shardings)
  state['step'] = state['step'] + 7
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 7, state)
  mngr.wait_until_finished()
  restored = checkpoint.restore(mngr, mngr.latest_step(), abstract)
  assert mngr.latest_step() == 7
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  leaf = restored['params']['patch_embed']['kernel']
  assert leaf.sharding == shardings['params']['patch_embed']['kernel']


@pytest.mark.parametrize('field,value,message', [
    ('total_steps', 0, 'config.total_steps=0'),
    ('checkpoint_every_steps', -5, 'config.checkpoint_every_steps=-5'),
    ('max_consecutive_nonfinite', 0, 'config.max_consecutive_nonfinite=0'),
    ('sample.num_steps', 0, 'config.sample.num_steps=0'),
    ('ema_decay', 1.5, 'config.ema_decay=1.5: must be in [0, 1]'),
    ('batch_size', 12, 'config.batch_size=12 is not divisible'),
    ('grad_accum_steps', 3, 'config.grad_accum_steps=3'),
    ('model.remat', 'some', "config.model.remat='some'"),
    ('model.text_embedding_std', 0.0, 'config.model.text_embedding_std=0.0: must be positive'),
    ('sample.reconstruction_guidance', -1.0, 'config.sample.reconstruction_guidance=-1.0: must be >= 0'),
    ('sample.extension_reconstruction_guidance', -2.0, 'config.sample.extension_reconstruction_guidance=-2.0: must be >= 0'),
    ('mesh.tensor', 3, 'config.mesh'),
    ('model.patch', (3, 8, 8), 'config.data.frames=8'),
    ('model.num_heads', 5, 'config.model.num_heads=5'),
])
def test_bad_config_is_a_one_line_error_naming_the_field(tiny_config, field, value, message):
  config = tiny_config
  parent, _, name = field.rpartition('.')
  (config[parent] if parent else config)[name] = value
  with pytest.raises(UsageError, match=re.escape(message)) as e:
    train.validate_config(config, 8)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_remat_and_gradient_accumulation_give_the_plain_gradients(tiny_config):
  from flax import nnx
  from sora_jax.models import dit
  config = tiny_config
  config.model.update(depth=2)
  batch = fixed_batch(config)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(batch['video'], jnp.float32) / 127.5 - 1
  inputs = (x0, jnp.asarray(rng.normal(size=x0.shape), jnp.float32), jnp.linspace(0.05, 1.0, 8),
            dict(tokens_bl=jnp.asarray(batch['tokens']), token_mask_bl=jnp.asarray(batch['token_mask'])),
            dict(mask_bt=jnp.asarray(np.arange(8)[None] < np.array([0, 1, 2, 4, 0, 3, 0, 6])[:, None])))  # given frames

  def loss_and_grads():
    graphdef, params = nnx.split(dit.from_config(config.model, 3, nnx.Rngs(0)), nnx.Param)
    # Away from the zero init, so that every branch (adaLN gates included) carries gradient.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
                          params.to_pure_dict())
    return jax.jit(train.make_loss_and_grads(config, graphdef))(params, *inputs)

  loss, grads = loss_and_grads()
  for remat, accum in (('dots', 1), ('none', 2), ('full', 8)):
    config.model.remat, config.grad_accum_steps = remat, accum
    loss_b, grads_b = loss_and_grads()
    np.testing.assert_allclose(loss_b, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_b, grads)


def test_bfloat16_compute_keeps_float32_parameters_and_a_close_loss(tiny_config):
  config = tiny_config
  config.optim.warmup_steps = 0  # so that steps 2 and 3 see trained, non-zero output layers
  batch = fixed_batch(config)
  _, losses32 = run_steps(config, jax.devices()[:1], batch, 3)
  config.model.dtype = 'bfloat16'
  state, losses16 = run_steps(config, jax.devices()[:1], batch, 3)
  assert losses16 != losses32  # bfloat16 really computed
  np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in jax.tree.leaves(state['opt_state'])} <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}


def test_the_ema_decay_warms_up_and_reaches_the_configured_decay_only_at_its_step():
  assert float(optim.ema_decay_at(0.998, 0)) == pytest.approx(0.1)
  assert float(optim.ema_decay_at(0.998, 2199)) < 0.998  # the default's 2200 steps never reach it
  assert float(optim.ema_decay_at(0.998, 4489)) < 0.998 <= float(optim.ema_decay_at(0.998, 4491))
  ema = optim.ema_update({'w': jnp.zeros(2)}, {'w': jnp.ones(2)}, 0.998, 2199)
  np.testing.assert_allclose(ema['w'], 1 - 2200 / 2209, rtol=1e-4)
