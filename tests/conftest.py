"""Every test sees 8 simulated CPU devices, so sharded code paths run on one machine."""

import os


def _xla_knows(flag: str) -> bool:
  """Whether this jaxlib's XLA has `flag` (XLA aborts on an unknown one in XLA_FLAGS)."""
  import importlib.util
  import mmap
  (folder,) = importlib.util.find_spec('jaxlib').submodule_search_locations
  path = os.path.join(folder, 'libjax_common.so')
  if not os.path.exists(path):
    return False
  with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    return m.find(flag.encode()) >= 0


# Tests compile far more than they compute: unoptimized CPU code generation (-40% compile time) and
# XLA:CPU's older loop emitters (half the compile time of the tiny train step again: 3.9-5.3 s
# against 8.3-9.4; the suite 703 s against 844-1018 s; the emitted code runs ~10% slower).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0' + (
    ' --xla_cpu_use_fusion_emitters=false' if _xla_knows('xla_cpu_use_fusion_emitters') else '')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' {TEST_XLA_FLAGS} '
                           '--xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session's workers and the subprocesses they start: many
# tests compile the same tiny train step. A fresh folder per session, so no stale entries, removed
# when the session ends (by the process that made it: xdist's workers inherit it).
_OWN_CACHES = []
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile  # noqa: E402
  os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(
      tempfile.gettempdir(), f'sora_jax_test_cache_{os.environ.get("PYTEST_XDIST_TESTRUNUID", os.getpid())}')
  _OWN_CACHES.append(os.environ['JAX_COMPILATION_CACHE_DIR'])

# The shapes classifier (FVD features, learned judge) trains on first use: into this session's own
# cache, never the user's ~/.cache, and shorter (the tests need a working judge, not the best one).
if 'SORA_JAX_CACHE' not in os.environ:
  os.environ['SORA_JAX_CACHE'] = os.environ['JAX_COMPILATION_CACHE_DIR'] + '_classifiers'
  _OWN_CACHES.append(os.environ['SORA_JAX_CACHE'])
os.environ.setdefault('SORA_JAX_CLASSIFIER_STEPS', '150')

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
  """Removes the caches this session made (tens of MB a run in the temp folder otherwise)."""
  del exitstatus
  if not hasattr(session.config, 'workerinput'):  # the controller, after its workers are done
    import shutil
    for path in _OWN_CACHES:
      shutil.rmtree(path, ignore_errors=True)


def subprocess_env(devices: int, **extra) -> dict:
  """The environment of a test's subprocess: this session's, on `devices` simulated CPU devices (`extra` overrides)."""
  return {**os.environ, 'XLA_FLAGS': f'{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}',
          'JAX_PLATFORMS': 'cpu', **extra}


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


T5_TRAINING_TEXT = (
    'a red circle moving right', 'a green square moving up', 'a blue triangle moving left',
    'the quick brown fox jumps over the lazy dog', 'video of a cat playing piano in the snow',
    'Sora generates videos from text prompts', 'hello world 123')


@pytest.fixture(scope='session')
def t5_dirs(tmp_path_factory):
  """Small random `T5EncoderModel` and `UMT5EncoderModel` folders in the Hugging Face layout, with a
  sentencepiece tokenizer trained here ({'t5': path, 'umt5': path}); no download."""
  import io

  import sentencepiece as spm
  import torch
  import transformers

  spiece = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(T5_TRAINING_TEXT * 20), model_writer=spiece,
                                 vocab_size=56, hard_vocab_limit=False, model_type='unigram',
                                 pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
                                 minloglevel=2)
  dirs = {}
  for kind, model_cls, config_cls in (('t5', transformers.T5EncoderModel, transformers.T5Config),
                                      ('umt5', transformers.UMT5EncoderModel, transformers.UMT5Config)):
    path = tmp_path_factory.mktemp(kind)
    (path / 'spiece.model').write_bytes(spiece.getvalue())
    torch.manual_seed(0)
    # 8 buckets up to distance 20: prompts of 16+ tokens reach the log-spaced buckets.
    model = model_cls(config_cls(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                                 feed_forward_proj='gated-gelu', relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20))
    model.save_pretrained(path)
    transformers.T5Tokenizer.from_pretrained(path).save_pretrained(path)
    dirs[kind] = str(path)
  return dirs


def save_random_wan_vae(path, **overrides):
  """A random diffusers `AutoencoderKLWan` saved to `path` (norm scales and biases perturbed so
  that every parameter matters); returns the torch model."""
  import torch
  from diffusers import AutoencoderKLWan

  torch.manual_seed(0)
  kw = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0])
  kw.update(overrides)
  model = AutoencoderKLWan(**kw).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'gamma' in name or 'bias' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope='session')
def wan_vae_dir(tmp_path_factory):
  """A small random Wan 2.1 VAE in the diffusers layout: x4 in time, x4 in space, 4 latent channels."""
  path = tmp_path_factory.mktemp('wan_vae')
  save_random_wan_vae(path)
  return str(path)


def pytest_collection_modifyitems(items):
  """Modules with more slow (end-to-end) tests first, each module's tests together (its module-scoped
  fixtures are built once): with `-n 2` the long tests then overlap and short ones fill the end,
  instead of one worker running a two-minute test alone at the end of the session."""
  slow = {}
  for item in items:
    slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(item.get_closest_marker('slow'))
  items.sort(key=lambda item: -slow[item.module.__name__])  # stable: same order on every worker
