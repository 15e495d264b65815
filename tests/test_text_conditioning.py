"""A DiT trains and samples on the embeddings of a frozen T5/UMT5 encoder chosen by the config."""

import jax
import numpy as np
import pytest
from flax import nnx

from sora_jax import UsageError, sample, train
from sora_jax.models import dit
from sora_jax.text import load_text_encoder


def t5_config(config, path):
  config.text_encoder.update(kind='t5', path=path)
  config.data.max_text_len = 12
  return config


def test_the_dit_takes_frozen_embeddings_and_honours_their_mask(t5_dirs):
  encoder = load_text_encoder(t5_dirs['umt5'], max_len=12)
  model = dit.DiT(channels=3, patch=(2, 8, 8), width=32, depth=1, num_heads=2, text_dim=encoder.dim,
                  rngs=nnx.Rngs(0))
  assert not hasattr(model, 'text_encoder')  # nothing of the byte encoder is built
  x = jax.random.normal(jax.random.key(0), (2, 4, 16, 16, 3))
  t = np.array([0.3, 0.7], np.float32)
  emb, mask = encoder.encode(['a red circle', 'a red circle'])
  base = model(x, t, text_bld=emb, text_mask_bl=mask)
  noisy = emb + np.where(mask[..., None], 0.0, 100.0)  # change only the padded rows
  np.testing.assert_allclose(model(x, t, text_bld=noisy, text_mask_bl=mask), base, atol=1e-5)
  with pytest.raises(ValueError, match="takes \\['text', 'text_mask'\\]"):
    model(x, t, np.zeros((2, 12), np.int32), mask)


@pytest.mark.slow
def test_training_with_a_frozen_umt5_samples_with_a_negative_prompt(tiny_config, t5_dirs, tmp_path):
  config = t5_config(tiny_config, t5_dirs['umt5'])
  workdir = str(tmp_path / 'run')
  state = train.train_and_evaluate(config, workdir)
  assert int(state['step']) == config.total_steps
  # The checkpoint holds the DiT only: its text projection reads the encoder's width (32), and
  # no encoder weight (the 64 x 32 embedding) was trained or saved.
  params = state['params']
  assert 'text_encoder' not in params and params['text_proj']['kernel'].shape == (32, config.model.width)
  model = sample.load(workdir)
  assert model.text_encoder is not None and model.text_encoder.path == t5_dirs['umt5']
  prompts = ['a red circle moving right']
  plain = sample.generate(model, prompts, seed=0, guidance_scale=4.0)
  negative = sample.generate(model, prompts, seed=0, guidance_scale=4.0, negative_prompt='a blue square')
  again = sample.generate(model, prompts, seed=0, guidance_scale=4.0, negative_prompt='')
  assert plain.shape == (1, config.data.frames, config.data.height, config.data.width, 3)
  np.testing.assert_array_equal(again, plain)  # the empty negative prompt is the default null branch
  assert np.abs(negative.astype(int) - plain.astype(int)).max() > 0


@pytest.mark.parametrize('field, value, message', [
    ('kind', 'clip', "config.text_encoder.kind='clip': use one of"),
    ('path', None, 'config.text_encoder.path is not set'),
    ('path', '/nonexistent/t5', "config.text_encoder.path='/nonexistent/t5': no such folder"),
    ('dtype', 'float16', "config.text_encoder.dtype='float16': use"),
])
def test_a_bad_text_encoder_config_is_a_one_line_error(tiny_config, t5_dirs, field, value, message):
  config = t5_config(tiny_config, t5_dirs['t5'])
  config.text_encoder[field] = value
  with pytest.raises(UsageError, match=message):
    train.validate_config(config, jax.device_count())
