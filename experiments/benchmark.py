r"""Times the real jitted train step, or compiles it ahead of time for a TPU slice from any machine.

  python experiments/benchmark.py --config=configs/shapes.py [--config.model.dtype=bfloat16]
  python experiments/benchmark.py --config=configs/shapes.py --analyze_only   # no allocation
  python experiments/benchmark.py --config=configs/shapes.py --sweep_frames=8,16,32,64

Ahead of time, for a TPU slice (needs libtpu: `pip install -e '.[tpu]'`; runs on a CPU, allocates
nothing; one mesh axis of the config given as -1 fills the slice):

  python experiments/benchmark.py --config=configs/video_dit.py:2B --analyze_only --topology=v5p:4x4x4
  python experiments/benchmark.py --config=configs/video_dit.py:2B --sweep --topology=v5p:4x4x4

The step is `train.make_train_step` jitted with the trainer's shardings and donation, on a
random (or, ahead of time, abstract) batch of the config's shape: the same remat policy and
micro-batches (`config.grad_accum_steps`) as a real run. FLOPs are counted analytically
(`dit.forward_flops_per_sample`: matmuls incl. attention, train step = 3 x forward) and
cross-checked against XLA's cost analysis of the compiled step. The peak is a dense matmul of the
model's dtype, timed on every device at once in the same run, just before and just after the
step's timing (the higher counts, so a drifting machine makes the MFU err low). Prints progress, then one JSON line
last (`--sweep`: one per remat policy).

Per-device memory (`per_device_bytes`): the most loaded device's share of params, optimizer state
and EMA (from their shardings), the batch, XLA's temporaries, and the compiled step's total
(arguments + outputs - donated aliases + temporaries). With a known HBM size (a TPU, real or
`--topology`), `fits` compares that total with it (and is false where XLA itself refuses the
program as too large for the chip); `--analyze_only` exits with code 3 and one `error:` line naming
the shortfall and what to change when the config does not fit. XLA's temporaries are what its
scheduler chose within the chip's memory (it may prefetch more FSDP all-gathers where there is
room), so they are an upper bound on what the step needs, not a minimum.

`xla_estimated_step_s` is the TPU compiler's roofline estimate (`cost_analysis()['optimal_seconds']`).
XLA's cost analysis counts a loop body once: with `grad_accum_steps` > 1 its FLOPs and time cover
one micro-batch plus the update (`analytic_over_xla` then shows roughly the micro-batch count).
Compiling for a slice is slow on a small CPU (this repo's blocks are unrolled: minutes for 20-40
blocks); an out-of-memory compile fails fast.
"""

import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sora_jax import UsageError, init_devices, optim, sample, sharding, train
from sora_jax.data import packing
from sora_jax.models import autoencoder as autoencoder_lib
from sora_jax.models import dit
import sora_jax.text as text_lib

config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:variant]).',
                                lock_config=True)
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_integer('steps', 10, 'Timed steps.')
flags.DEFINE_bool('analyze_only', False, 'Parameters, FLOPs and compiled memory; nothing allocated.')
flags.DEFINE_list('sweep_frames', None, 'Clip lengths to measure in turn (one JSON line each), e.g. 8,16,32.')
flags.DEFINE_string('topology', None, 'Compile ahead of time for this TPU slice instead of the local '
                    'devices, e.g. v5p:4x4x4, v6e:16x16, v5e:4x4 (implies --analyze_only; needs libtpu).')
flags.DEFINE_bool('sweep', False, 'With --topology: for each remat policy, the largest clip (frames '
                  'doubled from the config\'s) whose train step fits the slice; one JSON line each.')
flags.DEFINE_list('sweep_remat', ['none', 'dots', 'full'], 'With --sweep: the remat policies to try.')
flags.DEFINE_integer('sweep_max_frames', 1024, 'With --sweep: the longest clip to try.')
FLAGS = flags.FLAGS

GiB = 2**30
NOT_FIT_EXIT_CODE = 3

# HBM per chip by `device_kind`, as libtpu's compiler budgets it (the "available HBM" of its
# out-of-memory error, jax 0.10.2): a little under the nominal 16/32/32/16/95/32/192 GiB. Compile-only
# topologies expose no memory_stats(); real devices report `bytes_limit`, which takes precedence.
HBM_GIB_PER_CHIP = {
    'TPU v2': 2 * 7.48,
    'TPU v3': 2 * 15.48,
    'TPU v4': 2 * 15.25,
    'TPU v5 lite': 15.75,  # v5e
    'TPU v5': 95.74,  # v5p
    'TPU v6 lite': 31.25,  # v6e (Trillium)
    'TPU7x': 2 * 94.75,  # Ironwood
}


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


# ------------------------------------------------------------------------------------------------
# Devices: local, or the abstract devices of a TPU slice.
# ------------------------------------------------------------------------------------------------


def topology_devices(name: str) -> list:
  """The abstract devices of TPU slice `name` (e.g. 'v5p:4x4x4'); compile-only, no TPU needed."""
  # Compile-only: no chip to guard, so several processes (parallel tests) may load libtpu at once.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except Exception as e:  # no libtpu, or a name libtpu does not know
    raise UsageError(f'--topology={name}: {str(e).strip().splitlines()[0][:300]} (a TPU slice name such '
                     "as v5p:4x4x4 or v6e:4x4; needs libtpu: pip install -e '.[tpu]')") from None


def hbm_bytes_per_device(devices) -> int | None:
  """The device's memory limit: `memory_stats()` where it has one, else the table by device kind."""
  device = devices[0]
  try:
    limit = (device.memory_stats() or {}).get('bytes_limit')
  except Exception:  # compile-only devices: "only supported for addressable PjRt devices"
    limit = None
  if limit:
    return int(limit)
  gib = HBM_GIB_PER_CHIP.get(device.device_kind)
  if gib is None:
    return None
  # Some topologies list each TensorCore of a chip (v4, v3, TPU7x) as its own device.
  chips = collections.Counter(tuple(getattr(d, 'coords', None) or (d.id,)) for d in devices)
  return int(gib * GiB) // max(chips.values())


# ------------------------------------------------------------------------------------------------
# The train step, as the trainer builds it: shared by the timing and the ahead-of-time paths.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
  config: object
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: object
  graphdef: object
  autoencoder: object
  abstract_state: dict
  shardings: dict
  batch_shardings: dict
  abstract_batch: dict
  figures: dict  # parameters, tokens, analytic FLOPs


def build_step(config, devices) -> Step:
  """Validates `config` for `devices` and builds the jitted step's inputs; allocates nothing."""
  train.validate_config(config, len(devices), devices[0].platform)
  if config.data.name == 'encoded':
    raise UsageError('config.data.name="encoded": benchmark the step on clips (the same DiT step, plus the encoders)')
  if text_lib.is_frozen(config):  # its weights would have to be loaded (not AOT-able) and its FLOPs counted
    raise UsageError(f'config.text_encoder.kind={config.text_encoder.kind!r}: the benchmark times DiTs with the '
                     f'byte encoder; use --config.text_encoder.kind=byte (a frozen encoder costs one forward pass)')
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  rules = sharding.rules_tuple(config.sharding_rules)
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, abstract_state, shardings = train.state_shardings(config, mesh, tx)
  autoencoder = sample.abstract_model(config)[2]
  d = config.data
  latent_thw = autoencoder.latent_shape(d.frames, d.height, d.width)
  tokens_per_sample = packing.tokens_of(latent_thw, config.model.patch)
  forward_flops = dit.forward_flops_per_sample(config.model, latent_thw, autoencoder.channels, d.max_text_len)
  figures = dict(num_params=sum(x.size for x in jax.tree.leaves(abstract_state['params'])),
                 batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps,
                 remat=config.model.remat, clip=[d.frames, d.height, d.width],
                 tokens_per_sample=tokens_per_sample, tokens_per_step=tokens_per_sample * config.batch_size,
                 forward_flops_per_sample=forward_flops, model_flops_per_step=3 * forward_flops * config.batch_size,
                 dtype=config.model.dtype, mesh=sharding.mesh_shape(config.mesh, len(devices)),
                 devices=len(devices), num_devices=len(devices), platform=devices[0].platform,
                 device_kind=devices[0].device_kind)
  batch_shardings = {k: sharding.batch_sharding(mesh, nd, rules) for k, nd in train.batch_ndims(config).items()}
  abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_shardings[k])
                    for k, (shape, dtype) in batch_shapes(config).items()}
  return Step(config, mesh, rules, tx, graphdef, autoencoder, abstract_state, shardings, batch_shardings,
              abstract_batch, figures)


def batch_shapes(config) -> dict:
  """name -> (global shape, dtype) of each input of the train step."""
  d, b = config.data, config.batch_size
  every = dict(video=((b, d.frames, d.height, d.width, 3), jnp.uint8), tokens=((b, d.max_text_len), jnp.int32),
               token_mask=((b, d.max_text_len), jnp.bool_), label=((b,), jnp.int32))
  return {k: every[k] for k in train.batch_ndims(config)}


def jit_step(step: Step):
  """The trainer's jitted step: explicit shardings, the state donated. Call under the mesh and rules."""
  return train.jit_train_step(step.config, step.graphdef, step.tx, step.autoencoder, step.mesh,
                              step.shardings, step.batch_shardings)


def out_of_memory(error: Exception) -> dict | None:
  """The needed and available bytes of XLA's out-of-memory compile error (None: another error)."""
  text = str(error)
  if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
    return None
  units = dict(K=2**10, M=2**20, G=2**30, T=2**40)
  found = {}
  for key, pattern in (('needed', r'required for [^(]*\(([\d.]+)([KMGT])\)'),
                       ('available', r'available HBM \(([\d.]+)([KMGT])\)')):
    match = re.search(pattern, text)
    if match:
      found[key] = int(float(match.group(1)) * units[match.group(2)])
  return dict(compile_error=text.strip().splitlines()[0][:300], **found)


def analyze(step: Step, step_fn, hbm_bytes: int | None):
  """Compiles `step_fn` for the abstract state and batch: (figures, the compiled step or None).

  Figures: XLA's FLOPs and time estimate, per-device memory and, with a known HBM size, the fit.
  An out-of-memory compile error is a result (fits=False, compiled None), not an exception.
  """
  result = {}
  start = time.perf_counter()
  try:
    compiled = step_fn.lower(step.abstract_state, step.abstract_batch, train.frozen_params(step.config, step.autoencoder)).compile()
  except Exception as e:  # XLA refuses a program larger than the device's memory at compile time
    oom = out_of_memory(e)
    if oom is None:
      raise
    compiled = None
    result.update(oom)
  result['compile_s'] = round(time.perf_counter() - start, 2)
  state_bytes = {item: max_bytes_per_device(step.abstract_state[item]) for item in ('params', 'opt_state', 'ema')}
  per_device = dict(state_bytes, batch=max_bytes_per_device(step.abstract_batch))
  if compiled is not None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get('flops'):
      # The compiled SPMD program is one device's share; XLA also counts elementwise work.
      result['xla_flops_per_step'] = float(cost['flops']) * len(step.mesh.devices.flat)
      result['analytic_over_xla'] = step.figures['model_flops_per_step'] / result['xla_flops_per_step']
    if cost and cost.get('optimal_seconds', 0) > 0:  # the TPU compiler's roofline estimate of one step
      result['xla_estimated_step_s'] = float(cost['optimal_seconds'])  # (seen negative: then left out)
    memory = compiled.memory_analysis()
    if memory is not None:
      total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)
      result['compiled_bytes_per_device'] = dict(
          arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
          temp=memory.temp_size_in_bytes, aliased=memory.alias_size_in_bytes,
          code=memory.generated_code_size_in_bytes, total=total)
      per_device.update(temp=memory.temp_size_in_bytes, total=total)
  elif 'needed' in result:
    per_device['total'] = result['needed']
  result['per_device_bytes'] = per_device
  if hbm_bytes is None:
    hbm_bytes = result.get('available')
  if hbm_bytes is not None:
    result['hbm_bytes_per_device'] = hbm_bytes
    result['fits'] = compiled is not None and per_device.get('total', math.inf) <= hbm_bytes
  result.pop('available', None)
  result.pop('needed', None)
  return result, compiled


def measure(config, analyze_only: bool, topology: str | None = None) -> dict:
  """Compiles (and, on local devices unless analyze_only, times) the train step of `config`.

  With `topology`, compiles for the abstract devices of that TPU slice (nothing can run there).
  """
  devices = topology_devices(topology) if topology else jax.devices()
  step = build_step(config, devices)
  result = dict(topology=topology, **step.figures) if topology else dict(step.figures)
  with jax.set_mesh(step.mesh), nn.logical_axis_rules(step.rules):
    step_fn = jit_step(step)
    figures, compiled = analyze(step, step_fn, hbm_bytes_per_device(devices))
    result.update(figures)
    if analyze_only or topology or compiled is None:
      return result

    state = train.create_state(config, step.autoencoder.channels, step.tx, step.shardings)
    batch = random_batch(config, step.batch_shardings)
    frozen = jax.device_put(train.frozen_params(config, autoencoder_lib.make(config.autoencoder)),  # a VAE's real weights
                            sharding.replicated(step.mesh))
    for _ in range(max(FLAGS.warmup, 1)):
      state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready(metrics)
    peak_before = matmul_peak_flops(jnp.dtype(config.model.dtype), devices)
    logging.info('timing %d steps', FLAGS.steps)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready((state, metrics))
    step_time = (time.perf_counter() - start) / FLAGS.steps

  model_flops = result['model_flops_per_step']
  # The machine's speed drifts (shared hosts, clocks): the higher of the peaks timed just before and
  # just after the step's timing, so the MFU errs low.
  peak = max(peak_before, matmul_peak_flops(jnp.dtype(config.model.dtype), devices))
  stats = devices[0].memory_stats() or {}
  result.update(step_time_s=step_time, steps_per_s=1 / step_time,
                tokens_per_s=result['tokens_per_step'] / step_time,
                achieved_flops_per_s=model_flops / step_time, peak_flops_per_s=peak,
                mfu=model_flops / step_time / peak,
                peak_bytes_in_use=stats.get('peak_bytes_in_use'))
  return result


def random_batch(config, shardings):
  rng = np.random.default_rng(0)
  high = dict(video=256, tokens=258, label=config.model.get('num_classes') or 1)
  local = {}
  for k, (shape, dtype) in batch_shapes(config).items():
    local[k] = (np.ones(shape, bool) if k == 'token_mask' else
                rng.integers(2 if k == 'tokens' else 0, high[k], shape).astype(dtype))
  return {k: jax.device_put(v, shardings[k]) for k, v in local.items()}


# ------------------------------------------------------------------------------------------------
# Fitting a slice.
# ------------------------------------------------------------------------------------------------


def _gib(nbytes) -> str:
  return f'{nbytes / GiB:.1f}'


def shortfall_message(config, result: dict, config_name: str) -> str:
  """One line: needed vs available GiB per device, where the bytes go, and what to change."""
  b, hbm, mesh = result['per_device_bytes'], result['hbm_bytes_per_device'], result['mesh']
  state = b['params'] + b['opt_state'] + b['ema']
  needed = b.get('total')
  temp = b.get('temp', None if needed is None else needed - state - b['batch'])
  where = result.get('topology') or f'these {result["num_devices"]} devices'
  oom = ', XLA out of memory at compile' if 'compile_error' in result else ''
  head = (f'{config_name} does not fit {where} ({result["device_kind"]}): needs '
          f'{"more than " + _gib(hbm) if needed is None else _gib(needed)} GiB per device, {_gib(hbm)} GiB '
          f'available (params + optimizer + EMA {_gib(state)}, batch {_gib(b["batch"])}, temporaries '
          f'{"?" if temp is None else _gib(temp)} GiB{oom})')
  fixes = []
  if needed is None or state > needed / 10:  # the state matters: shard it further
    if mesh['fsdp'] * mesh['tensor'] * mesh['sequence'] < result['num_devices']:
      fixes.append(f'more FSDP (config.mesh.fsdp={mesh["fsdp"]} of {result["num_devices"]} devices; '
                   '--config.mesh.fsdp=-1 --config.mesh.data=1 shards the state over all)')
    else:
      fixes.append(f'a larger slice (FSDP x tensor already spans all {result["num_devices"]} devices)')
  if config.model.remat != 'full':
    fixes.append(f'a remat policy that keeps less (--config.model.remat=full'
                 f'{", or dots" if config.model.remat == "none" else ""})')
  accum, dp = config.grad_accum_steps, mesh['data'] * mesh['fsdp']
  if config.batch_size % (2 * accum * dp) == 0:
    fixes.append(f'smaller micro-batches (--config.grad_accum_steps={2 * accum})')
  else:
    fixes.append(f'a smaller --config.batch_size (each micro-batch already has '
                 f'{config.batch_size // (accum * dp)} sample(s) per data-parallel shard)')
  if mesh['tensor'] * mesh['sequence'] < result['num_devices']:
    fixes.append(f'splitting each sample over more chips (--config.mesh.tensor={2 * mesh["tensor"]})')
  fixes.append(f'a shorter clip (--config.data.frames={config.data.frames // 2})')
  return f'{head}; to fit: ' + '; or '.join(fixes)


def sweep_clips(config, topology: str) -> list[dict]:
  """For each remat policy, the longest clip (frames doubled from the config's) that fits `topology`.

  Height, width, batch, micro-batches and mesh stay the config's. Prints one JSON line per policy.
  """
  for policy in FLAGS.sweep_remat:
    if policy not in dit.REMAT_POLICIES:
      raise UsageError(f'--sweep_remat={policy}: use some of {",".join(dit.REMAT_POLICIES)}')
  d, start = config.data, config.data.frames
  results = []
  for policy in FLAGS.sweep_remat:
    config.model.remat = policy
    tried = {}

    def fits(frames):
      config.data.frames = frames
      r = measure(config, analyze_only=True, topology=topology)
      if 'fits' not in r:
        raise UsageError(f'--topology={topology}: HBM size of {r["device_kind"]!r} unknown (add it to '
                         'HBM_GIB_PER_CHIP in experiments/benchmark.py)')
      logging.info('remat=%s clip %dx%dx%d (%d tokens/sample): %s of %s GiB per device, %s (compile %.0f s)',
                   policy, frames, d.height, d.width, r['tokens_per_sample'],
                   _gib(r['per_device_bytes'].get('total', math.nan)), _gib(r['hbm_bytes_per_device']),
                   'fits' if r['fits'] else 'does not fit', r['compile_s'])
      tried[frames] = r
      return r['fits']

    frames, best = start, None
    if fits(frames):
      best = frames
      while frames * 2 <= FLAGS.sweep_max_frames and fits(frames * 2):
        frames = best = frames * 2
    else:  # shorten until it fits, down to one patch of frames
      while frames // 2 >= config.model.patch[0] and (frames // 2) % config.model.patch[0] == 0:
        frames //= 2
        if fits(frames):
          best = frames
          break
    first = tried[start]
    line = dict(remat=policy, topology=topology, num_devices=first['num_devices'], device_kind=first['device_kind'],
                hbm_bytes_per_device=first['hbm_bytes_per_device'], num_params=first['num_params'],
                batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps, mesh=first['mesh'],
                largest_fitting_clip=None if best is None else [best, d.height, d.width],
                compile_s=round(sum(r['compile_s'] for r in tried.values()), 2))
    if best is not None:
      r = tried[best]
      line.update(tokens_per_sample=r['tokens_per_sample'], per_device_bytes=r['per_device_bytes'],
                  model_flops_per_step=r['model_flops_per_step'], xla_estimated_step_s=r.get('xla_estimated_step_s'))
    too_long = sorted(f for f, r in tried.items() if not r['fits'] and (best is None or f > best))
    if too_long:  # the next rung: why the ladder stopped
      line['next_clip'] = [too_long[0], d.height, d.width]
      line['next_clip_bytes_per_device'] = tried[too_long[0]]['per_device_bytes'].get('total')
    elif best is not None:
      line['next_clip'] = None  # --sweep_max_frames reached
    print(json.dumps(line), flush=True)
    results.append(line)
  config.data.frames = start
  return results


def config_name() -> str:
  """The --config argument as given (path and variant), for messages."""
  flag = FLAGS['config']
  return getattr(flag, 'config_filename', None) or 'the config'


def main(argv):
  del argv
  init_devices()
  config = FLAGS.config
  topology = FLAGS.topology
  try:
    if FLAGS.sweep:
      if not topology:
        raise UsageError('--sweep needs --topology (the slice to fit); --sweep_frames times clip lengths locally')
      sweep_clips(config, topology)
      return
    if topology and not FLAGS.analyze_only:
      logging.info('--topology compiles for a slice that is not here: analysis only')
    if not FLAGS.sweep_frames:
      result = measure(config, FLAGS.analyze_only, topology)
      print(json.dumps(result), flush=True)
      if result.get('fits') is False:
        print('error: ' + shortfall_message(config, result, config_name()), file=sys.stderr, flush=True)
        sys.exit(NOT_FIT_EXIT_CODE)
      return
    for frames in FLAGS.sweep_frames:  # the sequence grows with the clip length
      config.data.frames = int(frames)
      result = measure(config, FLAGS.analyze_only, topology)
      logging.info('frames %s: %s tokens/sample, %s', frames, result['tokens_per_sample'],
                   {k: result.get(k) for k in ('step_time_s', 'mfu', 'fits')})
      print(json.dumps(dict(result, frames=int(frames))), flush=True)
  except UsageError as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
