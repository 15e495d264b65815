"""`attention_impl='splash'`: the Pallas TPU flash-attention kernel, with padding masks and packed rows
as segment ids. Checked here in Pallas' interpret mode (the same kernel, interpreted on the CPU)
against `xla_attention`, and compiled for a TPU slice ahead of time (needs libtpu)."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax import sharding
from sora_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arrays(rng, *shapes):
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]


def assert_same_with_gradients(fast, reference, args, real=None, atol=2e-5):
  """Equal outputs and gradients of a random read-out (on `real` [b, s] queries only, if given)."""
  keep = (lambda x: x) if real is None else (lambda x: jnp.where(real[..., None, None], x, 0))  # noqa: E731
  np.testing.assert_allclose(keep(fast(*args)), keep(reference(*args)), atol=atol)
  w = jnp.asarray(np.random.default_rng(9).normal(size=fast(*args).shape), jnp.float32)
  loss = lambda f: lambda *a: jnp.sum(keep(f(*a)) * w)  # noqa: E731
  argnums = tuple(range(len(args)))
  for g, g_ref in zip(jax.grad(loss(fast), argnums)(*args), jax.grad(loss(reference), argnums)(*args)):
    np.testing.assert_allclose(g, g_ref, atol=atol)


def test_splash_equals_xla_attention_for_key_masks_and_packed_segments():
  rng = np.random.default_rng(0)
  # 40 queries and 10 / 40 keys: padded to the kernel's 128-token tiles inside.
  q, k, v, text_k, text_v = arrays(rng, (2, 40, 3, 8), (2, 40, 3, 8), (2, 40, 3, 8), (2, 10, 3, 8), (2, 10, 3, 8))
  text_mask = jnp.asarray(np.arange(10)[None] < np.array([[7], [1]]))  # caption padding; one real key
  assert_same_with_gradients(lambda q, k, v: layers.attend(q, k, v, text_mask, implementation='splash'),
                             lambda q, k, v: layers.attend(q, k, v, text_mask), (q, text_k, text_v))
  assert_same_with_gradients(lambda q, k, v: layers.attend(q, k, v, implementation='splash'),
                             lambda q, k, v: layers.attend(q, k, v), (q, k, v))
  # Packed rows: two samples and padding, then one sample.
  segments = jnp.array([[1] * 15 + [2] * 20 + [0] * 5, [1] * 40])
  assert_same_with_gradients(
      lambda q, k, v: layers.segment_attention(q, k, v, segments, segments, implementation='splash'),
      lambda q, k, v: layers.segment_attention(q, k, v, segments, segments), (q, k, v), real=segments > 0)
  # A query whose segment has no key gets a finite (unused) output, not NaN.
  lonely = layers.segment_attention(q, k, v, segments.at[0, 0].set(7), segments, implementation='splash')
  assert np.isfinite(np.asarray(lonely)).all()


def test_splash_on_a_mesh_with_sequence_parallelism_equals_unsharded_attention():
  from configs.shapes import SHARDING_RULES
  rules = sharding.rules_tuple(SHARDING_RULES)
  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2, sequence=2))
  rng = np.random.default_rng(1)
  q, k, v, text_k, text_v = arrays(rng, (2, 32, 4, 8), (2, 32, 4, 8), (2, 32, 4, 8), (2, 6, 4, 8), (2, 6, 4, 8))
  segments = jnp.array([[1] * 10 + [2] * 17 + [0] * 5, [1] * 3 + [2] * 29])  # crossing shard edges
  text_mask = jnp.asarray(np.arange(6)[None] < np.array([[6], [2]]))
  self_splash = lambda q, k, v: layers.self_attention(q, k, v, implementation='splash', segment_bs=segments)  # noqa: E731
  cross_splash = lambda q, k, v: layers.attend(q, k, v, text_mask, implementation='splash')  # noqa: E731
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tokens = NamedSharding(mesh, P(('data', 'fsdp'), 'sequence', 'tensor'))
    text = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor'))
    q, k, v = (jax.device_put(x, tokens) for x in (q, k, v))
    text_k, text_v = (jax.device_put(x, text) for x in (text_k, text_v))
    out = jax.jit(self_splash)(q, k, v)
    cross = jax.jit(cross_splash)(q, text_k, text_v)
    real = segments > 0
    loss = lambda f, *a: jnp.sum(jnp.where(real[..., None, None], f(*a), 0) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(lambda *a: loss(self_splash, *a), argnums=(0, 1, 2)))(q, k, v)
    cross_grads = jax.jit(jax.grad(lambda *a: loss(cross_splash, *a), argnums=(0, 1, 2)))(q, text_k, text_v)
  assert out.sharding.spec[1] == 'sequence' and cross.sharding.spec[1] == 'sequence'
  plain = lambda q, k, v: layers.segment_attention(q, k, v, segments, segments)  # noqa: E731
  plain_cross = lambda q, k, v: layers.attend(q, k, v, text_mask)  # noqa: E731
  np.testing.assert_allclose(np.asarray(out)[np.asarray(real)], np.asarray(plain(q, k, v))[np.asarray(real)], atol=2e-5)
  np.testing.assert_allclose(cross, plain_cross(q, text_k, text_v), atol=2e-5)
  for got, f, args in ((grads, plain, (q, k, v)), (cross_grads, plain_cross, (q, text_k, text_v))):
    for g, g_ref in zip(got, jax.grad(lambda *a: loss(f, *a), argnums=(0, 1, 2))(*args)):
      np.testing.assert_allclose(g, g_ref, atol=5e-5)


def test_a_packed_dit_row_with_splash_gives_the_xla_outputs_and_gradients():
  """Self-attention within each clip and cross-attention to each clip's own caption slot, as segment ids."""
  from sora_jax.data import packing
  from sora_jax.text import byte
  from tests.test_packing import PATCH, random_dit
  graphdef, params = random_dit()
  splash_graphdef, _ = random_dit(attention_impl='splash')
  rng = np.random.default_rng(0)
  row = packing.pack([rng.normal(size=(4, 8, 12, 3)), rng.normal(size=(2, 4, 8, 3))], PATCH, length=16, align=4)
  tokens, mask = byte.tokenize(['a red circle moving right', 'a blue square', ''], 16)
  t = jnp.array([[0.3, 0.8, 0.5]])
  real = row['segment_s'][None] > 0
  w = jnp.asarray(rng.normal(size=(1, 16, 4 * 4 * 2 * 3)), jnp.float32)

  def loss(graphdef, params, layout):
    out = nnx.merge(graphdef, params).forward_packed(
        row['x_sp'][None], t, row['segment_s'][None], row['pos_s3'][None], tokens[None], mask[None], layout=layout)
    return jnp.sum(jnp.where(real[..., None], out * w, 0)), out

  (_, out), grads = jax.jit(jax.value_and_grad(lambda p: loss(splash_graphdef, p, (4, 12)), has_aux=True))(params)
  (_, out_ref), grads_ref = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p, (4, 12)), has_aux=True))(params)
  scale = float(jnp.abs(out_ref).max())
  np.testing.assert_allclose(jnp.where(real[..., None], out, 0), jnp.where(real[..., None], out_ref, 0),
                             atol=1e-5 * scale)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, atol=1e-4 * float(jnp.abs(g_ref).max() + 1e-6), rtol=1e-4)


@pytest.mark.slow
def test_the_train_step_with_splash_on_a_data_fsdp_tensor_sequence_mesh_matches_xla_on_one_device(tiny_config):
  from tests.test_train import fixed_batch, one_device_reference, run_steps
  config = tiny_config
  config.model.update(width=32, num_heads=4, text_heads=2)
  batch = fixed_batch(config)
  single, losses1 = one_device_reference(config, batch, 2)
  config.model.attention_impl = 'splash'
  config.mesh.update(sharding.MESH_PRESETS['fsdp_tp_sp'])
  sharded, losses8 = run_steps(config, jax.devices()[:8], batch, 2)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               jax.device_get(sharded['params']), jax.device_get(single['params']))


def test_splash_is_refused_where_there_is_no_tpu():
  from configs import shapes
  from sora_jax import UsageError, train
  config = shapes.get_config('tiny')
  config.model.attention_impl = 'splash'
  with pytest.raises(UsageError, match='attention_impl="splash".*TPU devices'):
    train.validate_config(config, 1)  # this CPU
  train.validate_config(config, 4, 'tpu')  # compiling for a TPU slice


def test_a_checkpoint_trained_with_splash_samples_here_with_xla_attention(tiny_config, tmp_path):
  from sora_jax import checkpoint, optim, sample, train
  config = tiny_config
  config.model.attention_impl = 'splash'  # as a TPU run writes it
  (tmp_path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  _, _, shardings = train.state_shardings(config, mesh, tx)
  mngr = checkpoint.manager(str(tmp_path))
  checkpoint.save(mngr, 3, train.create_state(config, 3, tx, shardings))
  mngr.wait_until_finished()
  model = sample.load(str(tmp_path))
  assert model.config.model.attention_impl == 'xla' and model.step == 3
  assert sample.generate(model, ['a red circle'], num_steps=1).shape == (1, 8, 32, 32, 3)


HLO_PROBE = r'''
import json, re, sys
sys.argv = ['benchmark.py', '--config=configs/shapes.py:tiny', '--topology=v5e:2x2', '--config.model.attention_impl=splash',
            '--config.data.height=256', '--config.data.width=256']  # 4096 tokens a clip, 2 clips a chip
sys.path.insert(0, 'experiments')
from absl import flags
import benchmark, jax
from flax import linen as nn
from sora_jax import train
flags.FLAGS(sys.argv)
step = benchmark.build_step(flags.FLAGS.config, benchmark.topology_devices('v5e:2x2'))
with jax.set_mesh(step.mesh), nn.logical_axis_rules(step.rules):
  compiled = benchmark.jit_step(step).lower(step.abstract_state, step.abstract_batch,
                                            train.frozen_params(step.config, step.autoencoder)).compile()
text = compiled.as_text()
print(json.dumps(dict(kernels=text.count('tpu_custom_call'), scores=len(re.findall(r'4096,4096', text)),
                      temp=compiled.memory_analysis().temp_size_in_bytes)))
'''


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason="libtpu is not installed (pip install -e '.[tpu]')")
@pytest.mark.slow  # ~25 s: XLA's TPU compiler
def test_the_train_step_compiles_for_a_tpu_slice_with_the_kernel_and_no_token_by_token_scores():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  result = subprocess.run([sys.executable, '-c', HLO_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.splitlines()[-1])
  # Self- and cross-attention, forward and the two backward kernels (dq, dk/dv): 6 Mosaic calls in
  # the one-block model; no [4096, 4096] array anywhere (XLA's attention keeps 2 x 2 x 4096^2 f32
  # scores a layer: 256 MiB of its 509 MiB of temporaries, against 316 MiB in all here).
  assert r['kernels'] == 6 and r['scores'] == 0, r
  assert r['temp'] < 2 * 2 * 4096 * 4096 * 4 * 1.5, r
