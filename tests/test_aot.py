"""Ahead-of-time compile of the real train step for a TPU slice, on this CPU (needs libtpu).

`experiments/benchmark.py --analyze_only --topology=SLICE` compiles for the abstract devices of
the slice; a config that does not fit exits 3 with one `error:` line. The reference video configs
(configs/video_dit.py) are checked for their names' parameter counts without compiling.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="libtpu is not installed (pip install -e '.[tpu]')")


def run_benchmark(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  return subprocess.run([sys.executable, 'experiments/benchmark.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


@needs_libtpu
@pytest.mark.slow  # 15-25 s here, nearly all of it XLA's TPU compiler
def test_tiny_config_compiles_for_a_v5p_slice_and_fits():
  result = run_benchmark('--config=configs/shapes.py:tiny', '--analyze_only', '--topology=v5p:2x2x1',
                         '--config.mesh.data=1', '--config.mesh.fsdp=-1')
  assert result.returncode == 0, result.stderr[-3000:]
  r = json.loads(result.stdout.splitlines()[-1])
  assert r['topology'] == 'v5p:2x2x1' and r['num_devices'] == 4 and r['device_kind'] == 'TPU v5'
  assert r['mesh'] == dict(data=1, fsdp=4, tensor=1, sequence=1)
  assert 90 * GiB < r['hbm_bytes_per_device'] < 100 * GiB  # v5p: 95.74 GiB as libtpu budgets it
  b = r['per_device_bytes']
  assert set(b) >= {'params', 'opt_state', 'ema', 'temp', 'total'}
  # FSDP over 4 chips: a quarter of the float32 parameters (tiny norms and biases stay whole)
  assert r['num_params'] * 4 / 4 <= b['params'] < r['num_params'] * 4 / 2
  assert b['opt_state'] >= 2 * b['params'] and b['ema'] == b['params']
  assert 0 < b['temp'] < b['total'] <= r['hbm_bytes_per_device'] and r['fits'] is True
  assert r['model_flops_per_step'] == 3 * r['forward_flops_per_sample'] * r['batch_size'] > 0
  assert r['compile_s'] > 0 and r['xla_estimated_step_s'] > 0
  assert 'step_time_s' not in r  # nothing ran


@needs_libtpu
def test_a_clip_too_large_for_the_slice_exits_3_naming_the_shortfall_and_the_fixes():
  result = run_benchmark('--config=configs/shapes.py:tiny', '--analyze_only', '--topology=v5p:2x2x1',
                         '--config.data.height=1024', '--config.data.width=1024')
  assert result.returncode == 3, result.stderr[-3000:]
  error = result.stderr.strip().splitlines()[-1]
  assert error.startswith('error: configs/shapes.py:tiny does not fit v5p:2x2x1'), error
  assert 'GiB per device, 95.7 GiB available' in error
  for fix in ('--config.model.remat=full', '--config.grad_accum_steps=2'):
    assert fix in error
  r = json.loads(result.stdout.splitlines()[-1])
  assert r['fits'] is False and r['per_device_bytes']['total'] > r['hbm_bytes_per_device']


def _load_video_dit():
  spec = importlib.util.spec_from_file_location('video_dit_config', os.path.join(ROOT, 'configs', 'video_dit.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _num_params(config) -> int:
  import jax
  from sora_jax import sample
  return sum(x.size for x in jax.tree.leaves(sample.abstract_model(config)[1]))


@pytest.mark.parametrize('name', ['700M', '2B', '8B', '14B'])
def test_video_dit_configs_have_the_parameters_their_names_say_and_are_valid_on_their_slice(name):
  from sora_jax import train
  video_dit = _load_video_dit()
  config = video_dit.get_config(name)
  # Blocks are identical: count depth 1 and 2 from abstract shapes, extrapolate (exact, seconds).
  depth = config.model.depth
  counts = []
  for d in (1, 2):
    config.model.depth = d
    counts.append(_num_params(config))
  config.model.depth = depth
  num_params = counts[0] + (depth - 1) * (counts[1] - counts[0])
  target = float(name[:-1]) * (1e6 if name.endswith('M') else 1e9)
  assert abs(num_params / target - 1) < 0.15, (name, num_params)

  chips = math.prod(int(n) for n in config.aot_topology.split(':')[1].split('x'))  # v5p: a device per chip
  assert config.aot_topology.startswith('v5p:')
  sizes = train.validate_config(config, chips)
  assert -1 in config.mesh.values() and sizes['fsdp'] > 1
  assert config.model.dtype == 'bfloat16' and config.data.name == 'shapes'
  tokens = math.prod(n // p for n, p in zip((config.data.frames, config.data.height, config.data.width),
                                             config.model.patch))
  assert tokens >= 2048
  assert 1 <= config.batch_size / chips <= 2  # samples per chip per step


@needs_libtpu
@pytest.mark.slow
def test_sweep_finds_the_longest_clip_that_fits_a_slice_per_remat_policy():
  # v5e: 15.75 GiB per chip. 8 x 480 x 480 (14k tokens, 2 samples per chip) fits (6.2 GiB); 16 frames do
  # not (18.7 GiB), which XLA reports in seconds. One policy and a clip far below the limit keep the test
  # short (the fitting compile takes longer the larger the clip, and longer with remat: 42 s here without
  # it, 55 s with remat=full, 21 s at 8 x 128 x 128).
  result = run_benchmark('--config=configs/shapes.py:tiny', '--sweep', '--sweep_remat=none', '--topology=v5e:2x2',
                         '--config.data.frames=8', '--config.data.height=480', '--config.data.width=480')
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [json.loads(x) for x in result.stdout.splitlines()]
  assert line['remat'] == 'none' and line['device_kind'] == 'TPU v5 lite'
  assert line['largest_fitting_clip'] == [8, 480, 480] and line['next_clip'] == [16, 480, 480]
  assert line['per_device_bytes']['total'] <= line['hbm_bytes_per_device'] < line['next_clip_bytes_per_device']
