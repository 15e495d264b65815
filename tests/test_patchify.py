import numpy as np
import pytest

from sora_jax.models import dit


def test_patchify_then_unpatchify_is_identity():
  x = np.random.default_rng(0).normal(size=(2, 8, 16, 24, 3)).astype(np.float32)
  tokens = dit.patchify(x, (2, 8, 8))
  assert tokens.shape == (2, 4 * 2 * 3, 2 * 8 * 8 * 3)
  np.testing.assert_array_equal(dit.unpatchify(tokens, (2, 8, 8), (4, 2, 3), 3), x)


def test_each_token_holds_one_spacetime_patch_in_raster_order():
  x = np.arange(1 * 4 * 4 * 4 * 1, dtype=np.float32).reshape(1, 4, 4, 4, 1)
  tokens = np.asarray(dit.patchify(x, (2, 2, 2)))
  positions = np.asarray(dit.grid_positions((2, 2, 2)))
  for s, (t, h, w) in enumerate(positions):
    patch = x[0, 2 * t:2 * t + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2, 0]
    np.testing.assert_array_equal(tokens[0, s], patch.reshape(-1))


def test_patch_that_does_not_divide_the_video_is_an_error():
  with pytest.raises(ValueError, match='does not divide'):
    dit.patchify(np.zeros((1, 8, 30, 32, 3)), (2, 8, 8))
