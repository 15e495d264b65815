"""The two README commands, as a new user runs them (tiny config)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sora_jax import video
from tests.conftest import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, **env):
  env = subprocess_env(2, **env)
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.mark.slow
def test_main_trains_and_sample_writes_a_video(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  result = run('sora_jax.main', '--config=configs/shapes.py:tiny', f'--workdir={workdir}',
               f'--config.data.data_dir={data_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'steps/s' in result.stderr and 'ETA' in result.stderr
  names = set(os.listdir(workdir))
  assert {'checkpoints', 'metrics.jsonl', 'samples', 'config.json'} <= names
  assert any(n.startswith('events.out.tfevents') for n in names)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert rows[-1]['step'] == 4 and np.isfinite(rows[-1]['train/loss'])
  (sample_dir,) = os.listdir(os.path.join(workdir, 'samples'))
  assert len(os.listdir(os.path.join(workdir, 'samples', sample_dir))) == 4  # 2 prompts x mp4, gif

  # .mp4 here, from the raw parameters; the prompting flags' test (test_frame_conditioning.py) samples
  # .gif and .png from the EMA ones.
  path = str(tmp_path / 'red.mp4')
  # JAX picks its platforms itself, as for a user: with the 'tpu' extra installed (as CI does), its first
  # device query loads libtpu, which printed five lines about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES.
  result = run('sora_jax.sample', f'--workdir={workdir}', '--prompt=a red circle moving right',
               f'--out={path}', '--steps=3', '--guidance_scale=2', '--seed=1', '--params=raw', JAX_PLATFORMS='')
  assert result.returncode == 0, result.stderr[-3000:]
  assert video.read(path).shape == (8, 32, 32, 3)
  # Orbax's INFO lines (a dozen per restore) are kept out of a user's terminal.
  assert not [l for l in result.stderr.splitlines() if l.startswith('I') and 'checkpoint' in l], result.stderr
  assert 'read only' not in result.stderr and 'Type handler registry' not in result.stderr  # nor its noise
  assert 'TPU_WORKER_HOSTNAMES' not in result.stderr and 'InitGoogle' not in result.stderr, result.stderr


def test_sample_from_a_workdir_without_checkpoint_is_a_one_line_error(tmp_path):
  result = run('sora_jax.sample', f'--workdir={tmp_path}', '--prompt=a red circle moving right')
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr
  (line,) = [l for l in result.stderr.splitlines() if str(tmp_path) in l]  # said once, not logged too
  assert line.startswith('error: ')
  result = run('sora_jax.sample', f'--workdir={tmp_path}', '--prompt=a red circle', '--frames=abc')
  assert result.returncode != 0 and 'Traceback' not in result.stderr and 'FATAL' not in result.stderr
  assert "error: flag --frames=abc: invalid literal for int() with base 10: 'abc'" in result.stderr.splitlines()


def test_a_mistyped_config_field_or_file_is_one_line_without_traceback(tmp_path):
  for flag, expected in (('--config.model.dept=3', '''unknown config field 'dept' (did you mean "depth"?)'''),
                         ('--config=configs/nope.py', 'No such file'),
                         ('--config=configs/shapes.py:huge', "unknown variant 'huge'")):
    args = ['--config=configs/shapes.py:tiny', f'--workdir={tmp_path}', flag]
    result = run('sora_jax.main', *(args[1:] if flag.startswith('--config=') else args))
    assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
    (line,) = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert expected in line
  assert not os.listdir(tmp_path)  # nothing was started


def test_sampling_to_an_unwritable_path_fails_before_sampling(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  result = run('sora_jax.sample', f'--workdir={tmp_path}', '--prompt=a red circle moving right',
               f'--out={blocker}/red.mp4')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert f'error: --out={blocker}/red.mp4: cannot write' in result.stderr
