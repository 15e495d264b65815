"""Every test sees 8 simulated CPU devices, so sharded code paths run on one machine."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """A TFDS data dir holding the tiny shapes dataset of `configs/shapes.py:tiny`."""
  from sora_jax.data import shapes
  path = tmp_path_factory.mktemp('tfds')
  shapes.build(str(path), num_train=64, num_validation=8)
  return str(path)


@pytest.fixture
def tiny_config(data_dir):
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import shapes as shapes_config
  config = shapes_config.get_config('tiny')
  config.data.data_dir = data_dir
  return config
