"""experiments/benchmark.py times the real step and reports FLOPs and MFU in one JSON line."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The scripts import sora_jax from this checkout, installed or not.
PYTHONPATH = os.pathsep.join([ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])


@pytest.mark.slow
def test_benchmark_prints_step_time_flops_and_mfu_of_the_real_step():
  env = subprocess_env(2, PYTHONPATH=PYTHONPATH)
  result = subprocess.run(
      [sys.executable, 'experiments/benchmark.py', '--config=configs/shapes.py:tiny', '--steps=2',
       '--warmup=1', '--config.model.width=64', '--config.model.num_heads=2', '--config.mesh.fsdp=2',
       '--config.mesh.data=1', '--sweep_frames=4,8'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  short, long = [json.loads(line) for line in result.stdout.splitlines()]
  for r in (short, long):
    assert r['devices'] == 2 and r['step_time_s'] > 0 and 0 < r['mfu'] < 1
    assert r['model_flops_per_step'] == 3 * r['forward_flops_per_sample'] * r['batch_size']
    assert r['tokens_per_s'] == r['tokens_per_step'] / r['step_time_s']
  assert long['tokens_per_step'] == 2 * short['tokens_per_step']
  assert long['forward_flops_per_sample'] > 2 * short['forward_flops_per_sample'] * 0.9


@pytest.mark.slow
def test_analyze_only_shows_fsdp_dividing_the_state_per_device_without_allocating():
  env = subprocess_env(4, PYTHONPATH=PYTHONPATH)
  result = subprocess.run(
      [sys.executable, 'experiments/benchmark.py', '--config=configs/shapes.py:mesh=fsdp',
       '--analyze_only', '--config.model.depth=1', '--config.batch_size=8'],  # small: compile time
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  plan = json.loads(result.stdout.splitlines()[-1])
  fsdp, replicated = plan['per_device_bytes'], plan['num_params'] * 4  # float32 on every device
  assert fsdp['opt_state'] > 2 * fsdp['params']  # two Adam moments
  for item in ('params', 'ema'):
    assert 0.25 * replicated <= fsdp[item] < 0.3 * replicated  # 4-way FSDP (tiny norms and biases stay replicated)
  assert fsdp['opt_state'] < 0.3 * 2 * replicated
  assert 'step_time_s' not in plan
