"""The pod and cluster launch recipes are valid shell and drive the real entry point."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'experiments', 'launch', '*')))


def test_there_is_a_tpu_pod_and_a_slurm_recipe():
  names = {os.path.basename(p) for p in RECIPES}
  assert {'tpu_pod.sh', 'slurm_gpu.sbatch'} <= names


@pytest.mark.parametrize('path', RECIPES, ids=os.path.basename)
def test_each_recipe_parses_and_runs_sora_jax_main_distributed(path):
  result = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  text = open(path).read()
  assert 'sora_jax.main --distributed' in text
  for config in re.findall(r'configs/(\w+)\.py', text):
    assert os.path.exists(os.path.join(ROOT, 'configs', f'{config}.py')), config


def test_the_tpu_recipe_refuses_to_run_without_its_settings():
  env = {k: v for k, v in os.environ.items() if k not in ('PROJECT', 'ZONE', 'TPU_NAME', 'BUCKET')}
  result = subprocess.run(['bash', os.path.join(ROOT, 'experiments', 'launch', 'tpu_pod.sh'), 'run'],
                          capture_output=True, text=True, env=env)
  assert result.returncode != 0 and 'set PROJECT' in result.stderr


@pytest.mark.parametrize('flags, expected', [
    (['--coordinator_address=127.0.0.1:1234'], '--coordinator_address needs --num_processes and --process_id too'),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2', '--process_id=2'],
     '--process_id=2 is not in [0, --num_processes=2)'),
])
def test_incomplete_multiprocess_flags_are_a_one_line_error(tmp_path, flags, expected):
  result = subprocess.run([sys.executable, '-m', 'sora_jax.main', '--config=configs/shapes.py:tiny',
                           f'--workdir={tmp_path}', *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == f'error: {expected}'
