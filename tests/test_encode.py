"""`sora_jax.encode` precomputes latents and text embeddings; the DiT trains from them."""

import os

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags

from sora_jax import UsageError, encode, sample, train
from sora_jax.data import pipeline
from sora_jax.models import autoencoder as autoencoder_lib
from sora_jax.text import load_text_encoder


@pytest.fixture
def encode_flags():
  flags.FLAGS.mark_as_parsed()
  saved = flags.FLAGS.shard_size, flags.FLAGS.encode_batch_size
  flags.FLAGS.shard_size, flags.FLAGS.encode_batch_size = 16, 8
  yield flags.FLAGS
  flags.FLAGS.shard_size, flags.FLAGS.encode_batch_size = saved


@pytest.mark.slow
def test_encoded_records_equal_the_encoders_and_a_dit_trains_and_samples_from_them(
    tiny_config, wan_vae_dir, t5_dirs, tmp_path, encode_flags):
  config = tiny_config
  config.autoencoder.update(kind='wan', path=wan_vae_dir)
  config.text_encoder.update(kind='t5', path=t5_dirs['umt5'])
  config.data.update(frames=5, max_text_len=12)
  config.model.patch = (1, 2, 2)
  config.sample.prompts = config.sample.prompts[:1]
  encoded_dir = encode.encode(config, str(tmp_path / 'latents'))

  source = pipeline.data_source(config.data, 'train')
  config.data.update(name='encoded', encoded_dir=encoded_dir)
  encoded = pipeline.data_source(config.data, 'train')
  assert len(encoded) == len(source) == config.data.num_train
  ae = autoencoder_lib.make(config.autoencoder)
  text_encoder = load_text_encoder(t5_dirs['umt5'], max_len=12)
  for i in (0, 17, 63):  # shards of 16 records: first, middle, last
    record, clip = encoded[i], source[i]
    assert record['caption'] == clip['caption']
    latent = ae.encode(ae.params, np.asarray(clip['video'])[None].astype(np.float32) / 127.5 - 1.0)[0]
    np.testing.assert_allclose(record['latent'], latent, atol=1e-5)
    text, mask = text_encoder.encode([clip['caption'].decode()])
    np.testing.assert_array_equal(record['text_mask'], mask[0])
    np.testing.assert_allclose(record['text'].astype(np.float32), text[0], atol=2e-3)  # float16

  state = train.train_and_evaluate(config, str(tmp_path / 'dit'))
  assert int(state['step']) == config.total_steps
  videos = sample.generate(sample.load(str(tmp_path / 'dit')), ['a red circle moving right'], seed=0)
  assert videos.shape == (1, 5, 32, 32, 3)


def test_an_interrupted_encode_resumes_without_redoing_committed_shards(tiny_config, tmp_path, encode_flags):
  config = tiny_config
  encoded_dir = encode.encode(config, str(tmp_path))
  out = encode.dataset_dir(encoded_dir)
  shards = sorted(f for f in os.listdir(out) if f.startswith('encoded-train') and not f.endswith('.json'))
  assert len(shards) == 4  # 64 records in shards of 16
  before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards}
  for name in (shards[2], shards[2] + '.json', pipeline.ENCODED_CONFIG):  # as if killed in shard 2
    os.remove(os.path.join(out, name))
  encode.encode(config, str(tmp_path))
  after = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards}
  assert [f for f in shards if after[f] != before[f]] == [shards[2]]
  config.data.update(name='encoded', encoded_dir=encoded_dir)
  assert len(pipeline.data_source(config.data, 'train')) == 64
  batch = pipeline.to_example(pipeline.data_source(config.data, 'train')[5], config.data.max_text_len)
  assert set(batch) == {'latent', 'tokens', 'token_mask', 'label'} and batch['latent'].shape == (8, 32, 32, 3)


def test_training_on_an_encoding_of_another_config_is_refused_naming_the_field(tiny_config, tmp_path, encode_flags):
  config = tiny_config
  encoded_dir = encode.encode(config, str(tmp_path))
  config.data.update(name='encoded', encoded_dir=encoded_dir)
  train.validate_config(config, jax.device_count())
  config.data.max_text_len = 24
  with pytest.raises(UsageError, match='config.data.max_text_len=24, but .* was encoded with 32'):
    train.validate_config(config, jax.device_count())
  config.data.update(max_text_len=32, encoded_dir=str(tmp_path / 'nowhere'))
  with pytest.raises(UsageError, match='no 1.0.0/encode_config.json'):
    train.validate_config(config, jax.device_count())


def test_chunked_and_tiled_encoding_bound_memory_and_match_the_one_shot_encode(
    tiny_config, wan_vae_dir, tmp_path, encode_flags, monkeypatch):
  config = tiny_config
  config.autoencoder.update(kind='wan', path=wan_vae_dir)
  config.data.update(frames=9, num_train=16, num_validation=4)
  config.model.patch = (1, 2, 2)

  def encoded(name):
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.update(name='encoded', encoded_dir=encode.encode(config, str(tmp_path / name)))
    return pipeline.data_source(data, 'train')

  whole = encoded('whole')
  from sora_jax.models import vae
  pieces = []  # the frames of every jitted encoder call: bounded by the chunk and the tile
  real_chunk = vae._chunk
  monkeypatch.setattr(vae, '_chunk', lambda g, p, x, c, **kw: pieces.append(x.shape[1:3]) or real_chunk(g, p, x, c, **kw))
  encode_flags.chunk_frames = 4  # frames 0-4 (frame 0 and a chunk), then 5-8: the causal cache carries over
  try:
    chunked = encoded('chunked')
    assert set(pieces) == {(5, 32), (4, 32)}
    pieces.clear()
    encode_flags.tile, encode_flags.tile_overlap = 16, 8  # 32 x 32 frames as 3 x 3 tiles of 16
    tiled = encoded('tiled')
    assert set(pieces) == {(5, 16), (4, 16)}
    encode_flags.tile_overlap = 16
    with pytest.raises(UsageError, match='--tile=16 --tile_overlap=16'):
      encoded('bad')
  finally:
    encode_flags.chunk_frames, encode_flags.tile, encode_flags.tile_overlap = 0, 0, 64
  for i in (0, 15):
    np.testing.assert_allclose(chunked[i]['latent'], whole[i]['latent'], atol=1e-5)
    err = np.abs(tiled[i]['latent'] - whole[i]['latent']).mean() / np.abs(whole[i]['latent']).mean()
    # Approximate: this random VAE's receptive field spans the whole 32 x 32 frame (measured 0.16-0.17).
    assert 1e-3 < err < 0.25, err
