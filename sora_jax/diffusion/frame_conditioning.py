"""Frame conditioning: some frames of a clip are given, the model generates the rest.

One model does image-to-video, extension (forward and backward), keyframe interpolation, loops
and editing through a mask over the (latent) frames, `mask_bt` (True: given). In training each
sample draws a mask from the strategies below; its given frames enter the network clean (or
lightly noised), the DiT marks them with a learned embedding, and the loss skips them. In
sampling the given frames are held fixed and come back unchanged.

Pure functions over latent frames; the pixel -> latent frame mapping of a causal VAE (its first
latent frame encodes the first pixel frame alone) is `latent_frame_mask`.
"""

import jax
import jax.numpy as jnp
import numpy as np

# The strategies a conditioned training sample draws from (`config.frame_conditioning.strategies`
# gives their weights). The unconditioned share is 1 - `config.frame_conditioning.probability`.
STRATEGIES = ('first', 'first_k', 'last', 'last_k', 'first_last', 'keyframes')


def strategy_weights(weights: dict) -> np.ndarray:
  """The weights (name -> weight) as an array in STRATEGIES order; ValueError for unknown names,
  negative weights or a zero sum."""
  unknown = set(weights) - set(STRATEGIES)
  if unknown:
    raise ValueError(f'unknown strategies {sorted(unknown)}; use {STRATEGIES}')
  w = np.array([float(weights.get(name, 0.0)) for name in STRATEGIES])
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f'weights {dict(weights)} must be >= 0 with a positive sum')
  return w


def sample_masks(rng, batch: int, frames: int, *, probability: float, weights: dict,
                 keyframe_rate: float = 0.3, frames_b=None):
  """bool [batch, frames]: which latent frames each sample is given.

  A sample is conditioned with `probability`; it then draws a strategy by `weights` (name ->
  weight, names from STRATEGIES): 'first' frame 0 (image-to-video); 'first_k' frames [0, k) with k
  uniform in [1, frames - 1] (extension); 'last' the last frame; 'last_k' the last k frames
  (backward extension); 'first_last' both ends (interpolation, loops); 'keyframes' each frame
  with `keyframe_rate`. At least one frame is always generated: a mask that would cover every frame
  (e.g. 'first_last' on 2 frames) becomes empty, and a 1-frame clip is never conditioned.
  `frames_b` int [batch]: each sample's own length <= `frames` (packed clips of several lengths;
  frames beyond it are never given); None: all `frames` long.
  """
  w = strategy_weights(weights)
  r_on, r_kind, r_k, r_key = jax.random.split(rng, 4)
  f = jnp.arange(frames)[None, :]  # [1, T]
  n_b1 = jnp.full((batch, 1), frames) if frames_b is None else jnp.asarray(frames_b).reshape(batch, 1)
  kind_b = jax.random.choice(r_kind, len(STRATEGIES), (batch,), p=jnp.asarray(w / w.sum()))
  k_b1 = jax.random.randint(r_k, (batch, 1), 1, jnp.maximum(n_b1, 2))
  inside = f < n_b1
  masks = jnp.stack([
      jnp.broadcast_to(f == 0, (batch, frames)),
      f < k_b1,
      f == n_b1 - 1,
      inside & (f >= n_b1 - k_b1),
      (f == 0) | (f == n_b1 - 1),
      inside & jax.random.bernoulli(r_key, keyframe_rate, (batch, frames)),
  ])  # [strategies, b, T]
  mask_bt = jnp.take_along_axis(masks, kind_b[None, :, None], axis=0)[0]
  on_b1 = jax.random.uniform(r_on, (batch, 1)) < probability
  return on_b1 & mask_bt & ~jnp.all(mask_bt | ~inside, axis=1, keepdims=True)


def packed_token_mask(mask_bnt, segment_bs, pos_bs3, patch_t: int):
  """bool [b, s, patch_t]: the given frames inside each token of packed rows (`DiT.forward_packed`'s
  `frame_mask_bsk`), from each slot's frame mask [b, n, T] (slot i: segment i + 1); padding: none.
  A token at temporal position t holds frames t * patch_t ... (t + 1) * patch_t - 1 of its clip."""
  T = mask_bnt.shape[2]
  frame_bsk = pos_bs3[..., :1] * patch_t + jnp.arange(patch_t)
  per_token_bst = jnp.take_along_axis(mask_bnt, jnp.maximum(segment_bs - 1, 0)[..., None], axis=1)
  return jnp.take_along_axis(per_token_bst, jnp.minimum(frame_bsk, T - 1), axis=2) & (segment_bs > 0)[..., None]


def apply_to_input(x_t, x_given, mask_bt):
  """The network input: given frames [b, T, ...] from `x_given`, the others from `x_t`."""
  mask = mask_bt.reshape(mask_bt.shape + (1,) * (x_t.ndim - 2))
  return jnp.where(mask, x_given, x_t)


def latent_frame_mask(pixel_mask_t, temporal_factor: int) -> np.ndarray:
  """bool [latent frames]: the latent frames that hold a given pixel frame, for an autoencoder whose
  first latent frame encodes pixel frame 0 alone and each later one the next `temporal_factor`
  frames (a causal video VAE; factor 1 is pixel space, where the masks are the same)."""
  pixel_mask_t = np.asarray(pixel_mask_t, bool)
  if temporal_factor == 1:
    return pixel_mask_t
  spans = [pixel_mask_t[:1]] + [pixel_mask_t[1 + i:1 + i + temporal_factor]
                                for i in range(0, len(pixel_mask_t) - 1, temporal_factor)]
  return np.array([span.any() for span in spans])
