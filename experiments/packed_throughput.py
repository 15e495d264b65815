r"""Packed against fixed-size training throughput: the real train steps, timed alternately in one process.

  python experiments/packed_throughput.py [--steps=40] [--fixed_sizes=16x32x32,16x32x56]
  python experiments/packed_throughput.py --curriculum   # the curriculum's steps: 192- against 224-token rows

Builds the train step of `configs/shapes_native.py` (packed rows of 224 tokens, 9 a step, every size;
no frame conditioning, no curriculum) and of `configs/shapes.py` at about the same tokens per step for
each of `--fixed_sizes` (as many clips as fit in 2048 tokens: 16 of 16 x 32 x 32, 128 tokens each; 9 of
16 x 32 x 56, 224 tokens each, the packed rows' length, so only what packing adds differs), with the
same model, feeds each the batches its own pipeline makes, and times the steps in turn (each timing one
step, blocked until done) so that the machine's drift falls on all alike. Prints one JSON line: median
and fastest seconds per step, real (non-padding) patch tokens per step and per second of each, and
packed / fixed by either, per fixed size, and by the median over steps of each packed step against the
fixed step timed next to it (`packed_over_fixed_paired`: the least moved by the machine's drift).
Step times on a shared 2-core VM wander by ~10% from run to run: compare ratios, and several runs.
"""

import copy
import importlib.util
import json
import math
import os
import time

import jax
import numpy as np
from absl import app, flags
from flax import linen as nn

from sora_jax import optim, sharding, text as text_lib, train
from sora_jax.data import pipeline, shapes as shapes_data
from sora_jax.models import autoencoder as autoencoder_lib

flags.DEFINE_integer('steps', 40, 'Timed steps of each mode (after 3 warm-up steps each).')
flags.DEFINE_list('fixed_sizes', ['16x32x32', '16x32x56'], 'Fixed clip sizes (FxHxW) to compare packing with.')
flags.DEFINE_bool('curriculum', False, "Time the native config's curriculum steps instead: its clips in rows of "
                  'packing.curriculum_row_length ("packed"), in rows of packing.row_length, and as fixed-size '
                  'batches of as many clips.')
FLAGS = flags.FLAGS
TOKENS_PER_STEP = 2048

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def curriculum_configs():
  """The curriculum's train steps: its rows, rows of the config's row_length, a fixed-size batch."""
  native = load_config('shapes_native')
  modes = {}
  for name, length in (('packed', native.packing.curriculum_row_length),
                       (f'rows_of_{native.packing.row_length}', native.packing.row_length)):
    config = copy.deepcopy(native)
    config.packing.curriculum_row_length = length
    config = train.curriculum_config(config)  # its clip sizes, rows and frame conditioning
    config.packing.curriculum_steps = 0
    config.data.num_train = 2048  # a dataset of the curriculum's clips only: enough to time
    modes[name] = config
  (size,) = shapes_data.parse_sizes(native.packing.curriculum_sizes)
  fixed = load_config('shapes')
  fixed.data.frames, fixed.data.height, fixed.data.width = size
  fixed.batch_size = native.batch_size * native.packing.max_segments  # as many clips as the rows hold
  fixed.frame_conditioning.probability = modes['packed'].frame_conditioning.probability
  fixed.eval.every_steps = 0
  modes['fixed_' + native.packing.curriculum_sizes] = fixed
  return modes


def configs():
  if FLAGS.curriculum:
    return curriculum_configs()
  packed = load_config('shapes_native')
  packed.frame_conditioning.probability = 0.0
  packed.packing.curriculum_steps = 0
  modes = {'packed': packed}
  for size in FLAGS.fixed_sizes:
    fixed = load_config('shapes')
    try:
      fixed.data.frames, fixed.data.height, fixed.data.width = (int(n) for n in size.split('x'))
    except ValueError:
      raise app.UsageError(f'--fixed_sizes: {size!r} is not FRAMESxHEIGHTxWIDTH') from None
    tokens = math.prod(n // p for n, p in zip((fixed.data.frames, fixed.data.height, fixed.data.width),
                                               fixed.model.patch))
    fixed.batch_size = TOKENS_PER_STEP // tokens
    fixed.frame_conditioning.probability = 0.0
    fixed.eval.every_steps = 0
    modes[f'fixed_{size}'] = fixed
  return modes


def build(config):
  """(step_fn, state, frozen, batches: an endless iterator, real tokens a step, mesh, rules)."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_tuple(config.sharding_rules)
  source = pipeline.SkipBadRecords(pipeline.data_source(config.data, 'train'), config.data.max_text_len,
                                   name='train', tokenize=text_lib.tokenizer_from_config(config))
  stream = train.packed_stream(config, source) if train.packing_on(config) else source
  data = pipeline.make_iterator(stream, global_batch_size=config.batch_size, seed=config.data.seed,
                                max_text_len=config.data.max_text_len, shuffle=not train.packing_on(config))
  tx = optim.make_optimizer(config.optim, config.total_steps)
  graphdef, _, shardings = train.state_shardings(config, mesh, tx)
  autoencoder = autoencoder_lib.make(config.autoencoder)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = train.create_state(config, autoencoder.channels, tx, shardings)
    frozen = train.frozen_params(config, autoencoder, None)
    frozen = {k: jax.device_put(v, sharding.replicated(mesh)) for k, v in frozen.items()}
    batch_shardings = {k: sharding.batch_sharding(mesh, nd, rules) for k, nd in train.batch_ndims(config).items()}
    step_fn = train.jit_train_step(config, graphdef, tx, autoencoder, mesh, shardings, batch_shardings, None, frozen)

  # Real tokens a step: a fixed batch's are all real; packed rows' are the epoch's share of real tokens
  # (the first rows of an epoch are fuller than its last: a few steps would overstate it).
  if train.packing_on(config):
    tokens = stream.epoch_efficiency(0) * config.batch_size * config.packing.row_length
  else:
    tokens = float(config.batch_size * math.prod(n // p for n, p in zip(
        (config.data.frames, config.data.height, config.data.width), config.model.patch)))

  def batches():
    while True:
      local = next(data)
      yield {k: jax.make_array_from_process_local_data(batch_shardings[k], local[k]) for k in batch_shardings}
  return step_fn, state, frozen, batches(), tokens, mesh, rules


def main(argv):
  del argv
  modes = {name: build(c) for name, c in configs().items()}
  states = {name: m[1] for name, m in modes.items()}
  times = {name: [] for name in modes}
  for i in range(3 + FLAGS.steps):
    for name, (step_fn, _, frozen, batches, _, mesh, rules) in modes.items():
      batch = next(batches)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        start = time.perf_counter()
        states[name], metrics = step_fn(states[name], batch, frozen)
        jax.block_until_ready((states[name], metrics))
        seconds = time.perf_counter() - start
      if i >= 3:
        times[name].append(seconds)
  result = {}
  for name in modes:
    step_s, real = float(np.median(times[name])), modes[name][4]
    result[name] = {'step_time_s': round(step_s, 4), 'min_step_time_s': round(float(np.min(times[name])), 4),
                    'real_tokens_per_step': round(real, 1), 'real_tokens_per_s': round(real / step_s, 1)}
  ratio = lambda fixed, key: result['packed']['real_tokens_per_step'] / result[fixed]['real_tokens_per_step'] * (
      result[fixed][key] / result['packed'][key])
  others = [name for name in modes if name != 'packed']
  label = lambda name: name[len('fixed_'):] if name.startswith('fixed_') else name  # noqa: E731
  # real tokens/s of packed over the others, by median step times and by the fastest step of each
  result['packed_over_fixed'] = {label(name): round(ratio(name, 'step_time_s'), 3) for name in others}
  result['packed_over_fixed_by_min'] = {label(name): round(ratio(name, 'min_step_time_s'), 3) for name in others}
  # Step by step: each packed step against the fixed step timed right after it, so slow spells of a
  # shared machine fall on both sides of each ratio; the median over the steps.
  packed_times = np.array(times['packed'])
  result['packed_over_fixed_paired'] = {
      label(name): round(float(np.median(np.array(times[name]) / packed_times)) * result['packed']['real_tokens_per_step']
                         / result[name]['real_tokens_per_step'], 3) for name in others}
  result['steps'] = FLAGS.steps
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
