r"""Times the real jitted train step and reports model FLOPs utilisation against a measured peak.

  python experiments/benchmark.py --config=configs/shapes.py [--config.model.dtype=bfloat16]
  python experiments/benchmark.py --config=configs/shapes.py --analyze_only   # no allocation
  python experiments/benchmark.py --config=configs/shapes.py --sweep_frames=8,16,32,64

The step is `train.make_train_step` jitted with the trainer's shardings and donation, on a
random batch of the config's shape. FLOPs are counted analytically (`dit.forward_flops_per_sample`:
matmuls incl. attention, train step = 3 x forward) and cross-checked against XLA's cost analysis
of the compiled step. The peak is a dense matmul of the model's dtype, timed on every device at
once in the same run. Prints progress, then one JSON line last.
"""

import json
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sora_jax import UsageError, optim, sample, sharding, train
from sora_jax.models import dit

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:variant]).',
                                lock_config=True)
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_integer('steps', 10, 'Timed steps.')
flags.DEFINE_bool('analyze_only', False, 'Parameters, FLOPs and compiled memory; nothing allocated.')
flags.DEFINE_list('sweep_frames', None, 'Clip lengths to measure in turn (one JSON line each), e.g. 8,16,32.')
FLAGS = flags.FLAGS


def matmul_peak_flops(dtype, devices) -> float:
  """FLOP/s of one n x n matmul per device, all devices at once (simulated CPU devices share cores)."""
  n = 2048 if devices[0].platform == 'cpu' else 8192
  mesh = jax.make_mesh((len(devices),), ('d',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d'))
  a = jax.device_put(jnp.ones((len(devices), n, n), dtype), spec)
  f = jax.jit(lambda a: jnp.einsum('bij,bjk->bik', a, a, preferred_element_type=dtype), out_shardings=spec)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 * len(devices) / best


def max_bytes_per_device(abstract_tree) -> int:
  """Bytes that the most loaded device holds of a tree of sharded ShapeDtypeStructs."""
  per_device = {}
  for x in jax.tree.leaves(abstract_tree):
    nbytes = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for device in x.sharding.device_set:
      per_device[device] = per_device.get(device, 0) + nbytes
  return max(per_device.values(), default=0)


def random_batch(config, shardings):
  rng = np.random.default_rng(0)
  d = config.data
  b, l = config.batch_size, d.max_text_len
  local = dict(video=rng.integers(0, 256, (b, d.frames, d.height, d.width, 3), dtype=np.uint8),
               tokens=rng.integers(2, 258, (b, l), dtype=np.int32), token_mask=np.ones((b, l), bool))
  return {k: jax.device_put(v, shardings[k]) for k, v in local.items()}


def measure(config, analyze_only: bool) -> dict:
  """Compiles (and unless analyze_only, times) the train step of `config`; returns the figures."""
  train.validate_config(config, jax.device_count())
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_tuple(config.sharding_rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, abstract_state, shardings = train.state_shardings(config, mesh, tx)
  autoencoder = sample.abstract_model(config)[2]
  latent_thw = autoencoder.latent_shape(config.data.frames, config.data.height, config.data.width)
  tokens_per_sample = math.prod(n // p for n, p in zip(latent_thw, config.model.patch))
  forward_flops = dit.forward_flops_per_sample(config.model, latent_thw, autoencoder.channels,
                                               config.data.max_text_len)
  model_flops = 3 * forward_flops * config.batch_size
  result = dict(num_params=sum(x.size for x in jax.tree.leaves(abstract_state['params'])),
                batch_size=config.batch_size, tokens_per_step=tokens_per_sample * config.batch_size,
                forward_flops_per_sample=forward_flops, model_flops_per_step=model_flops,
                dtype=config.model.dtype, devices=jax.device_count(), platform=jax.devices()[0].platform,
                device_kind=jax.devices()[0].device_kind)

  batch_shardings = {k: sharding.batch_sharding(mesh, nd, rules)
                     for k, nd in (('video', 5), ('tokens', 2), ('token_mask', 2))}
  d = config.data
  abstract_batch = {
      'video': jax.ShapeDtypeStruct((config.batch_size, d.frames, d.height, d.width, 3), jnp.uint8,
                                    sharding=batch_shardings['video']),
      'tokens': jax.ShapeDtypeStruct((config.batch_size, d.max_text_len), jnp.int32,
                                     sharding=batch_shardings['tokens']),
      'token_mask': jax.ShapeDtypeStruct((config.batch_size, d.max_text_len), jnp.bool_,
                                         sharding=batch_shardings['token_mask'])}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jax.jit(train.make_train_step(config, graphdef, tx, autoencoder),
                      in_shardings=(shardings, batch_shardings),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    start = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch).compile()
    result['compile_s'] = round(time.perf_counter() - start, 2)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get('flops'):
      # The compiled SPMD program is one device's share; XLA also counts elementwise work.
      result['xla_flops_per_step'] = float(cost['flops']) * jax.device_count()
      result['analytic_over_xla'] = model_flops / result['xla_flops_per_step']
    # The state's share of the most loaded device, by item: what FSDP/tensor sharding buys.
    result['state_bytes_per_device'] = {
        item: max_bytes_per_device(abstract_state[item]) for item in ('params', 'opt_state', 'ema')}
    memory = compiled.memory_analysis()
    if memory is not None:
      result['compiled_bytes_per_device'] = dict(
          arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
          temp=memory.temp_size_in_bytes, aliased=memory.alias_size_in_bytes,
          total=memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
          - memory.alias_size_in_bytes)
    if analyze_only:
      return result

    state = train.create_state(config, autoencoder.channels, tx, shardings)
    batch = random_batch(config, batch_shardings)
    for _ in range(max(FLAGS.warmup, 1)):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    logging.info('timing %d steps', FLAGS.steps)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - start) / FLAGS.steps

  peak = matmul_peak_flops(jnp.dtype(config.model.dtype), jax.devices())
  stats = jax.devices()[0].memory_stats() or {}
  result.update(step_time_s=step_time, steps_per_s=1 / step_time,
                tokens_per_s=result['tokens_per_step'] / step_time,
                achieved_flops_per_s=model_flops / step_time, peak_flops_per_s=peak,
                mfu=model_flops / step_time / peak,
                peak_bytes_in_use=stats.get('peak_bytes_in_use'))
  return result


def main(argv):
  del argv
  config = FLAGS.config
  try:
    if not FLAGS.sweep_frames:
      print(json.dumps(measure(config, FLAGS.analyze_only)))
      return
    for frames in FLAGS.sweep_frames:  # the sequence grows with the clip length
      config.data.frames = int(frames)
      result = measure(config, FLAGS.analyze_only)
      logging.info('frames %s: %s tokens/sample, %s', frames, result['tokens_per_step'] // config.batch_size,
                   {k: result.get(k) for k in ('step_time_s', 'mfu')})
      print(json.dumps(dict(result, frames=int(frames))))
  except UsageError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
