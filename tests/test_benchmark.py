"""experiments/benchmark.py times the real step and reports FLOPs and MFU in one JSON line."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_step_time_flops_and_mfu_of_the_real_step():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2')
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
