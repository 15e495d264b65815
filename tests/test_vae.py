"""The causal video VAE: the Wan 2.1 import equals diffusers, time is causal, images are 1-frame videos."""

import json

import numpy as np
import pytest
import torch

from sora_jax import UsageError
from sora_jax.models import vae, vae_convert
from tests.conftest import save_random_wan_vae

LAYOUTS = {
    # diffusers' default layout at a small width: x8 in space, x4 in time (not in the first stage)
    'wan2.1': dict(dim_mult=[1, 2, 4, 4], temperal_downsample=[False, True, True]),
    'small': dict(dim_mult=[1, 2, 2], temperal_downsample=[True, True]),
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_wan_import_matches_diffusers_encode_and_decode(tmp_path, layout):
  ref = save_random_wan_vae(tmp_path, **LAYOUTS[layout])
  ours = vae_convert.load_wan(str(tmp_path))
  x = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
  with torch.no_grad():
    post = ref.encode(x).latent_dist  # diffusers runs it chunk by chunk with feature caches
    decoded_ref = ref.decode(post.mean).sample.numpy()
  to_ours = lambda t: np.asarray(t.permute(0, 2, 3, 4, 1))
  mean, logvar = ours.encode(to_ours(x))
  s = ours.cfg.spatial_factor
  assert mean.shape == (2, 3, 32 // s, 32 // s, 4)
  assert np.abs(np.asarray(mean) - to_ours(post.mean)).max() <= 1e-4
  assert np.abs(np.asarray(logvar) - to_ours(post.logvar)).max() <= 1e-4
  decoded = ours.decode(to_ours(post.mean))
  assert decoded.shape == (2, 9, 32, 32, 3)
  assert np.abs(np.asarray(decoded) - to_ours(torch.from_numpy(decoded_ref))).max() <= 1e-4
  np.testing.assert_allclose(ours.cfg.latents_std, [1.5, 2.0, 0.5, 1.0])


def test_a_later_frame_never_changes_an_earlier_latent_or_decoded_frame(wan_vae_dir):
  model = vae_convert.load_wan(wan_vae_dir)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 9, 16, 16, 3)).astype(np.float32)
  changed = x.copy()
  changed[:, 5:] = 0.0  # frames 5..8 make latent frame 2
  a, b = np.asarray(model.encode(x)[0]), np.asarray(model.encode(changed)[0])
  np.testing.assert_array_equal(a[:, :2], b[:, :2])
  assert np.abs(a[:, 2] - b[:, 2]).max() > 1e-3
  z = a.copy()
  z[:, 2] += 1.0
  da, db = np.asarray(model.decode(a)), np.asarray(model.decode(z))
  np.testing.assert_array_equal(da[:, :5], db[:, :5])  # latent 2 decodes to frames 5..8 only
  assert np.abs(da[:, 5:] - db[:, 5:]).max() > 1e-3


def test_an_image_is_a_one_frame_video(wan_vae_dir):
  model = vae_convert.load_wan(wan_vae_dir)
  x = np.random.default_rng(1).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
  image_latent = np.asarray(model.encode(x[:, :1])[0])
  assert image_latent.shape == (1, 1, 4, 4, 4)
  np.testing.assert_allclose(image_latent[:, 0], np.asarray(model.encode(x)[0])[:, 0], atol=1e-6)
  assert model.decode(image_latent).shape == (1, 1, 16, 16, 3)


@pytest.mark.parametrize('shortcuts', [False, True])
def test_a_patched_vae_with_a_stage_that_keeps_its_size_is_still_causal_and_chunks_exactly(shortcuts):
  # configs/vae_shapes.py's layout: 2 x 2 pixels to channels, then x2 in space once, x4 in time.
  cfg = vae.VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, patch_size=2,
                      spatial_downsample=(True, False), temporal_downsample=(True, True), shortcuts=shortcuts)
  assert cfg.spatial_factor == 4 and cfg.latent_shape(9, 16, 24) == (3, 4, 6)
  x = np.random.default_rng(4).uniform(-1, 1, (1, 9, 16, 24, 3)).astype(np.float32)
  np.testing.assert_array_equal(vae.unpatchify(vae.patchify(x, 2), 2), x)
  assert vae.patchify(x, 2)[0, 0, 1, 2].tolist() == x[0, 0, 2:4, 4:6].reshape(-1).tolist()
  from flax import nnx
  model = vae.VideoVAE(cfg, rngs=nnx.Rngs(0))
  mean = np.asarray(model.encode(x)[0])
  assert mean.shape == (1, 3, 4, 6, 4) and model.decode(mean).shape == x.shape
  changed = x.copy()
  changed[:, 5:] = 0.0  # frames 5..8 make latent frame 2
  np.testing.assert_array_equal(np.asarray(model.encode(changed)[0])[:, :2], mean[:, :2])
  np.testing.assert_allclose(vae.encode_chunked(model, x, chunk_frames=4)[0], mean, atol=1e-5)
  np.testing.assert_allclose(vae.decode_chunked(model, mean, chunk_latents=1), model.decode(mean), atol=1e-5)
  with pytest.raises(ValueError, match='spatial_downsample has 1 entries, expected one per downsampling stage \\(2\\)'):
    vae.VAEConfig(dim_mult=(1, 2, 2), temporal_downsample=(True, True), spatial_downsample=(True,))


def test_the_shortcuts_are_causal_average_pooling_down_and_nearest_upsampling_up():
  x = np.random.default_rng(5).uniform(-1, 1, (1, 9, 8, 8, 2)).astype(np.float32)
  down = np.asarray(vae.fold_shortcut(x, 2, 2, 2))  # frames (zeros, 0), (1, 2), ..., (7, 8); 2 x 2 blocks
  assert down.shape == (1, 5, 4, 4, 2)
  pool = lambda frames: frames.reshape(-1, 4, 2, 4, 2, 2).mean((0, 2, 4))  # noqa: E731
  np.testing.assert_allclose(down[0, 0], pool(np.concatenate([np.zeros_like(x[0, :1]), x[0, :1]])), atol=1e-6)
  np.testing.assert_allclose(down[0, 3], pool(x[0, 5:7]), atol=1e-6)
  np.testing.assert_allclose(vae.fold_shortcut(x, 1, 1, 1)[..., 0], x.mean(-1), atol=1e-6)  # channel means
  up = np.asarray(vae.unfold_shortcut(down, 2, 2, 2))  # latent frame 0 -> frame 0, then 2 frames each
  assert up.shape == x.shape
  t, h, w = np.meshgrid(np.arange(9), np.arange(8), np.arange(8), indexing='ij')
  np.testing.assert_array_equal(up[0], down[0, (t + 1) // 2, h // 2, w // 2])
  assert vae.match_channels(np.arange(3.0), 7).tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_clip_sizes_the_vae_cannot_take_are_refused_by_name():
  cfg = vae.VAEConfig(base_dim=8, z_dim=4)
  assert cfg.latent_shape(17, 64, 96) == (5, 8, 12)
  with pytest.raises(ValueError, match='frames must be 1 \\+ 4n'):
    cfg.latent_shape(16, 64, 64)
  with pytest.raises(ValueError, match='multiples of 8'):
    cfg.latent_shape(17, 60, 64)


def test_imports_that_do_not_fit_fail_naming_the_tensor_or_field(wan_vae_dir, tmp_path):
  with open(f'{wan_vae_dir}/config.json') as f:
    config = json.load(f)
  (tmp_path / 'v22').mkdir()
  with open(tmp_path / 'v22' / 'config.json', 'w') as f:
    json.dump({**config, 'is_residual': True}, f)
  with pytest.raises(UsageError, match='Wan 2.2'):
    vae_convert.load_wan(str(tmp_path / 'v22'))
  (tmp_path / 'wide').mkdir()
  with open(tmp_path / 'wide' / 'config.json', 'w') as f:
    json.dump({**config, 'base_dim': 16}, f)
  import shutil
  shutil.copy(f'{wan_vae_dir}/diffusion_pytorch_model.safetensors', tmp_path / 'wide')
  with pytest.raises(UsageError, match='decoder.conv_in.bias has shape \\(16,\\), config.json implies \\(32,\\)'):
    vae_convert.load_wan(str(tmp_path / 'wide'))


@pytest.mark.slow
def test_a_dit_trains_and_samples_in_the_latent_of_an_imported_vae(tiny_config, wan_vae_dir, tmp_path):
  from sora_jax import sample, train
  config = tiny_config
  config.autoencoder.update(kind='wan', path=wan_vae_dir)
  config.data.frames = 5  # -> 2 latent frames of 8 x 8 x 4
  config.model.patch = (1, 2, 2)
  config.sample.prompts = config.sample.prompts[:1]
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert state['params']['patch_embed']['kernel'].shape[0] == 1 * 2 * 2 * 4  # latent channels, not RGB
  model = sample.load(str(tmp_path / 'run'))
  videos = sample.generate(model, ['a red circle moving right'], seed=0)
  assert videos.shape == (1, 5, 32, 32, 3) and videos.dtype == np.uint8
  # Image-to-video through the causal VAE: the image is latent frame 0 (it encodes frame 0 alone).
  from sora_jax import prompting
  image = np.zeros((32, 32, 3), np.uint8)
  image[8:20, 8:20] = (255, 0, 0)
  animated = prompting.keyframes(model, ['a red circle moving right'], [(image, 0)], seed=0)
  assert animated.shape == (1, 5, 32, 32, 3) and not np.array_equal(animated, videos)


def test_data_sizes_the_vae_cannot_take_are_a_config_error(tiny_config, wan_vae_dir):
  import jax
  from sora_jax import train
  config = tiny_config
  config.autoencoder.update(kind='wan', path=wan_vae_dir)
  with pytest.raises(UsageError, match='config.data.frames/height/width=8x32x32 do not fit .*frames must be 1 \\+ 4n'):
    train.validate_config(config, jax.device_count())  # 8 frames
  config.data.frames = 9
  with pytest.raises(UsageError, match='config.model.patch=\\(2, 8, 8\\) does not divide config.data.frames=9 \\(latent frames 3\\)'):
    train.validate_config(config, jax.device_count())


def test_chunked_encode_and_decode_with_causal_caches_equal_the_one_shot_result(wan_vae_dir):
  model = vae_convert.load_wan(wan_vae_dir)
  x = np.random.default_rng(2).uniform(-1, 1, (1, 17, 16, 16, 3)).astype(np.float32)
  mean, logvar = model.encode(x)
  for chunk in (4, 8):  # 1 + 4 + 4 + 4 + 4 and 1 + 8 + 8 frames
    chunked_mean, chunked_logvar = vae.encode_chunked(model, x, chunk_frames=chunk)
    np.testing.assert_allclose(chunked_mean, mean, atol=1e-5)
    np.testing.assert_allclose(chunked_logvar, logvar, atol=1e-5)
  video = model.decode(mean)
  for chunk in (1, 3):  # 5 latent frames: 1 + 1 + 1 + 1 + 1 and 1 + 3 + 1
    np.testing.assert_allclose(vae.decode_chunked(model, mean, chunk_latents=chunk), video, atol=1e-5)
  with pytest.raises(ValueError, match='chunk_frames=6: use a positive multiple of 4'):
    vae.encode_chunked(model, x, chunk_frames=6)


def test_spatial_tiles_blended_over_overlaps_approach_the_untiled_result(wan_vae_dir):
  model = vae_convert.load_wan(wan_vae_dir)  # x4 in space
  x = np.random.default_rng(3).uniform(-1, 1, (1, 5, 48, 48, 3)).astype(np.float32)
  x = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3)) / 3  # some spatial correlation
  mean = np.asarray(model.encode(x)[0])
  np.testing.assert_allclose(vae.encode_tiled(model, x, tile=48, overlap=0, chunk_frames=4), mean, atol=1e-5)
  err = lambda a, b: float(np.abs(np.asarray(a) - b).max())
  blended = err(vae.encode_tiled(model, x, tile=32, overlap=16, chunk_frames=4), mean)
  abutting = err(vae.encode_tiled(model, x, tile=16, overlap=0, chunk_frames=4), mean)
  assert blended < abutting and blended < 0.5 * np.abs(mean).max(), (blended, abutting)
  video = np.asarray(model.decode(mean))
  np.testing.assert_allclose(vae.decode_tiled(model, mean, tile=12, overlap=0, chunk_latents=1), video, atol=1e-5)
  blended = err(vae.decode_tiled(model, mean, tile=8, overlap=4, chunk_latents=1), video)
  abutting = err(vae.decode_tiled(model, mean, tile=4, overlap=0, chunk_latents=1), video)
  assert blended < abutting, (blended, abutting)
