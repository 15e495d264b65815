"""The Flax T5/UMT5 encoder equals transformers' on random small models saved in the HF layout."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from sora_jax import UsageError, sharding
from sora_jax.text import load_text_encoder, t5
from sora_jax.text.tokenizer import Tokenizer

PROMPTS = ['a red circle moving right', '', 'the quick brown fox jumps over the lazy dog ' * 4,
           'café naïve 日本語 ✓', '  two  spaces ', 'Hello\nworld']
MAX_LEN = 24


def reference(path, kind, prompts=PROMPTS, max_len=MAX_LEN):
  """(ids, mask, last_hidden_state) from transformers, called as text-to-video pipelines call it."""
  tok = transformers.AutoTokenizer.from_pretrained(path)
  ref = tok(prompts, padding='max_length', truncation=True, max_length=max_len, return_tensors='np')
  cls = transformers.T5EncoderModel if kind == 't5' else transformers.UMT5EncoderModel
  model = cls.from_pretrained(path).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ref['input_ids']),
                attention_mask=torch.tensor(ref['attention_mask'])).last_hidden_state.numpy()
  return ref['input_ids'], ref['attention_mask'].astype(bool), out


@pytest.mark.parametrize('kind', ['t5', 'umt5'])
def test_encoder_and_tokenizer_match_transformers(t5_dirs, kind):
  ids_ref, mask_ref, out_ref = reference(t5_dirs[kind], kind)
  assert ids_ref[2, -1] == 1 and mask_ref[2].all()  # the long prompt was truncated, </s> kept
  encoder = load_text_encoder(t5_dirs[kind], max_len=MAX_LEN)
  ids, mask = encoder.tokenize(PROMPTS)
  np.testing.assert_array_equal(ids, ids_ref)
  np.testing.assert_array_equal(mask, mask_ref)
  emb, emb_mask = encoder.encode(PROMPTS)
  emb = np.asarray(emb)
  assert emb.shape == (len(PROMPTS), MAX_LEN, 32) and np.asarray(emb_mask).tolist() == mask_ref.tolist()
  err = np.abs(emb - out_ref)[mask_ref].max()
  assert err <= 1e-4, f'max abs error {err}'
  assert not emb[~mask_ref].any()  # padding rows are zero, not whatever the encoder left there


def test_umt5_has_a_position_bias_per_block_and_t5_only_in_the_first(t5_dirs):
  def bias_tables(kind):
    with open(os.path.join(t5_dirs[kind], 'config.json')) as f:
      cfg = t5.T5Config.from_hf(json.load(f))
    return [n for n, _ in t5.hf_names(cfg).values() if 'relative_attention_bias' in n]

  assert len(bias_tables('t5')) == 1 and len(bias_tables('umt5')) == 3


def test_tokenizer_json_alone_gives_the_same_ids(t5_dirs, tmp_path):
  for name in ('config.json', 'tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(os.path.join(t5_dirs['t5'], name), tmp_path / name)
  from_json = Tokenizer(str(tmp_path))(PROMPTS, MAX_LEN)
  from_spiece = Tokenizer(t5_dirs['t5'])(PROMPTS, MAX_LEN)
  np.testing.assert_array_equal(from_json[0], from_spiece[0])
  np.testing.assert_array_equal(from_json[1], from_spiece[1])


def test_sharded_load_splits_weights_and_gives_the_same_embeddings(t5_dirs):
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4, 'sequence': 1})
  rules = (('act_batch', ('data', 'fsdp')), ('text_embed', 'fsdp'), ('heads', 'tensor'), ('mlp', 'tensor'))
  sharded = load_text_encoder(t5_dirs['umt5'], max_len=MAX_LEN, mesh=mesh, rules=rules)
  wi = sharded.params['blocks'][0]['wi_0'][...]
  assert wi.shape == (32, 48) and wi.sharding.shard_shape(wi.shape) == (16, 12)  # d over fsdp, f over tensor
  emb, _ = sharded.encode(PROMPTS[:4])
  single, _ = load_text_encoder(t5_dirs['umt5'], max_len=MAX_LEN).encode(PROMPTS[:4])
  np.testing.assert_allclose(np.asarray(emb), np.asarray(single), atol=1e-5)


def test_bfloat16_parameters_stay_close_to_float32(t5_dirs):
  f32, _ = load_text_encoder(t5_dirs['t5'], max_len=MAX_LEN).encode(PROMPTS)
  bf16_encoder = load_text_encoder(t5_dirs['t5'], max_len=MAX_LEN, dtype='bfloat16')
  assert bf16_encoder.params['embedding'][...].dtype == jax.numpy.bfloat16
  bf16, _ = bf16_encoder.encode(PROMPTS)
  assert bf16.dtype == jax.numpy.bfloat16
  err = np.abs(np.asarray(bf16, np.float32) - np.asarray(f32)).max()
  assert err < 0.1 * np.abs(np.asarray(f32)).max(), err


def test_folders_that_are_not_t5_fail_with_the_file_named(t5_dirs, tmp_path):
  with pytest.raises(UsageError, match='no tokenizer \\(expected spiece.model or tokenizer.json\\)'):
    load_text_encoder(str(tmp_path))
  shutil.copy(os.path.join(t5_dirs['t5'], 'spiece.model'), tmp_path / 'spiece.model')
  with pytest.raises(UsageError, match='no config.json'):
    load_text_encoder(str(tmp_path))
  shutil.copy(os.path.join(t5_dirs['t5'], 'config.json'), tmp_path / 'config.json')
  with pytest.raises(UsageError, match='no \\*.safetensors'):
    load_text_encoder(str(tmp_path))
  shutil.copy(os.path.join(t5_dirs['t5'], 'model.safetensors'), tmp_path / 'model.safetensors')
  with open(tmp_path / 'config.json') as f:
    config = json.load(f)
  config['d_ff'] = 64
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(config, f)
  with pytest.raises(UsageError, match='model.safetensors: .*wi_0.weight has shape \\(48, 32\\), config.json implies \\(64, 32\\)'):
    load_text_encoder(str(tmp_path))
