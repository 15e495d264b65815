"""Rectified flow: x_t = (1 - t) x0 + t noise, velocity v = noise - x0; t = 1 is pure noise.

Pure functions: timestep sampling, the training loss and the Euler sampler with
classifier-free guidance. The network may predict the velocity directly or the clean sample x0,
from which v = (x_t - x0) / t; either way the loss is on the velocity.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp

from sora_jax.diffusion import frame_conditioning


def shift_time(t, shift: float):
  """Maps t toward noise for shift > 1 (SD3's resolution shift): t' = s t / (1 + (s - 1) t)."""
  return shift * t / (1 + (shift - 1) * t)


def size_shift(shift, tokens, base_tokens: int | None):
  """The time shift for a sample of `tokens` spacetime patches (SD3, Open-Sora): larger samples keep
  more of their signal at a given noise level, so they are noised further, the shift growing as
  sqrt(tokens / base_tokens). `base_tokens` 0 or None: `shift` at every size. `tokens` may be an array."""
  if not base_tokens:
    return shift
  return shift * jnp.sqrt(jnp.asarray(tokens, jnp.float32) / base_tokens)


def sample_time(rng, batch: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                high_noise_fraction: float = 0.0, high_noise_min: float = 0.8):
  """Logit-normal times [batch] in (0, 1), shifted; a fraction is drawn from U(high_noise_min, 1).

  Logit-normal(0, 1) almost never draws t > 0.95, yet sampling starts at t = 1: untrained
  high-noise predictions then turn noise into blocky artefacts that sampling keeps. Mixing in
  uniform high-noise times trains that end of the trajectory.
  """
  rng_ln, rng_mix, rng_u = jax.random.split(rng, 3)
  t = jax.nn.sigmoid(mean + std * jax.random.normal(rng_ln, (batch,)))
  t = shift_time(t, shift)
  uniform_high = jax.random.uniform(rng_u, (batch,), minval=high_noise_min, maxval=1.0)
  t = jnp.where(jax.random.uniform(rng_mix, (batch,)) < high_noise_fraction, uniform_high, t)
  return jnp.clip(t, 1e-5, 1.0)


def interpolate(x0, noise, t_b):
  t = t_b.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1 - t) * x0 + t * noise


def to_velocity(prediction, x_t, t_b, *, prediction_type: str):
  """The velocity implied by the network output ('velocity' or 'x0'): v = (x_t - x0) / t."""
  if prediction_type == 'velocity':
    return prediction
  if prediction_type == 'x0':
    t = jnp.maximum(t_b, 1e-6).reshape((-1,) + (1,) * (x_t.ndim - 1))  # t = 0 is never sampled
    return (x_t - prediction) / t
  raise ValueError(f'unknown prediction type {prediction_type!r}; expected velocity or x0')


def loss(apply_fn: Callable, x0, noise, t_b, *, prediction_type: str, min_t: float = 0.05, given_bt=None,
         given_t_b=None):
  """The velocity error of the network's prediction, averaged; apply_fn(x_t, t) -> output.

  For an x0 prediction the velocity error is (x0_pred - x0) / t, so the loss is the x0 error
  weighted by 1 / t^2; that weight is capped at 1 / min_t^2. The cap keeps the nearly clean
  steps (weights up to 1e4) from drowning the noisy ones, where layout and motion are decided,
  and, unlike clamping t inside the prediction, leaves the optimum at the true x0.
  Frame conditioning: the frames `given_bt` (bool [b, T]) enter the network clean (or noised to
  `given_t_b` [b]) and are left out of the loss, which averages over each sample's generated values.
  Returns (mean loss, per-sample loss [b]).
  """
  x_t = interpolate(x0, noise, t_b)
  if given_bt is not None:
    x_given = x0 if given_t_b is None else interpolate(x0, noise, given_t_b)
    x_t = frame_conditioning.apply_to_input(x_t, x_given, given_bt)
  out = apply_fn(x_t, t_b)
  if prediction_type == 'velocity':
    err = (out - (noise - x0)) ** 2
  elif prediction_type == 'x0':
    err = (out - x0) ** 2 / jnp.maximum(t_b, min_t).reshape((-1,) + (1,) * (x0.ndim - 1)) ** 2
  else:
    raise ValueError(f'unknown prediction type {prediction_type!r}; expected velocity or x0')
  axes = tuple(range(1, x0.ndim))
  if given_bt is None:
    per_sample = jnp.mean(err, axis=axes)
  else:  # at least one frame per sample is generated (frame_conditioning.sample_masks)
    generated = (~given_bt).astype(err.dtype).reshape(given_bt.shape + (1,) * (x0.ndim - 2))
    values_per_frame = math.prod(x0.shape[2:])
    per_sample = jnp.sum(err * generated, axis=axes) / (jnp.sum(generated, axis=axes) * values_per_frame)
  return jnp.mean(per_sample), per_sample


def packed_loss(apply_fn: Callable, x0_bsp, noise_bsp, t_bn, segment_bs, *, prediction_type: str,
                min_t: float = 0.05, weighting: str = 'sample', given_bsk=None):
  """`loss` for packed rows (`sora_jax.data.packing`): tokens [b, s, p] of up to n samples per row.

  Each token is noised to its own sample's time (t_bn [b, n]; segment_bs [b, s] 1..n, 0 padding);
  apply_fn(x_t [b, s, p], t_bn) -> output [b, s, p]. Padding costs nothing. `weighting`:
  'sample': every sample counts the same (the mean of per-sample means, as `loss` over a batch);
  'token': every generated value counts the same (large samples weigh more).
  given_bsk bool [b, s, patch_t]: the frames inside each token given clean (frame conditioning),
  left out of the loss; values are laid out (patch_t, ...) as `patchify` makes them.
  Returns (mean loss, per-slot loss [b, n]; 0 for empty slots).
  """
  b, s, p = x0_bsp.shape
  n = t_bn.shape[1]
  slot_bsn = segment_bs[..., None] == jnp.arange(1, n + 1)  # one-hot sample of each token
  t_bs = jnp.sum(jnp.where(slot_bsn, t_bn[:, None, :], 0.0), axis=-1)
  x_t = (1 - t_bs[..., None]) * x0_bsp + t_bs[..., None] * noise_bsp
  generated_bsp = jnp.broadcast_to((segment_bs > 0)[..., None], (b, s, p))
  if given_bsk is not None:
    k = given_bsk.shape[-1]
    given_bsp = jnp.repeat(given_bsk, p // k, axis=-1)  # each frame's values are contiguous
    x_t = jnp.where(given_bsp, x0_bsp, x_t)
    generated_bsp = generated_bsp & ~given_bsp
  out = apply_fn(x_t, t_bn)
  if prediction_type == 'velocity':
    err = (out - (noise_bsp - x0_bsp)) ** 2
  elif prediction_type == 'x0':
    err = (out - x0_bsp) ** 2 / jnp.maximum(t_bs, min_t)[..., None] ** 2
  else:
    raise ValueError(f'unknown prediction type {prediction_type!r}; expected velocity or x0')
  w = generated_bsp.astype(err.dtype)
  err_bs, count_bs = jnp.sum(err * w, axis=-1), jnp.sum(w, axis=-1)
  sums_bn = jnp.einsum('bs,bsn->bn', err_bs, slot_bsn.astype(err.dtype))
  counts_bn = jnp.einsum('bs,bsn->bn', count_bs, slot_bsn.astype(err.dtype))
  per_slot = sums_bn / jnp.maximum(counts_bn, 1.0)
  if weighting == 'sample':
    present = (counts_bn > 0).astype(err.dtype)
    mean = jnp.sum(per_slot * present) / jnp.maximum(jnp.sum(present), 1.0)
  elif weighting == 'token':
    mean = jnp.sum(sums_bn) / jnp.maximum(jnp.sum(counts_bn), 1.0)
  else:
    raise ValueError(f'weighting={weighting!r}: use "sample" or "token"')
  return mean, per_slot


def sample(velocity_fn: Callable, noise, *, num_steps: int, shift: float = 1.0, t_start: float = 1.0,
           stochasticity: float = 0.0, rng_b=None):
  """Integrates dx/dt = v from t_start to 0 as one `lax.scan`; velocity_fn(x_t, t_b) -> v.

  Each step splits x_t into its clean estimate x0 = x - t v and noise estimate e = x + (1 - t) v
  and moves to x_next = (1 - t_next) x0 + t_next e': with `stochasticity` eta = 0 that is the Euler
  step (e' = e); with eta > 0, e' = sqrt(1 - eta^2) e + eta z mixes in fresh noise z, which lets
  later steps correct what earlier ones got wrong (ragged edges the deterministic flow keeps).
  rng_b: one key per sample [b] (needed for eta > 0), so a sample's noise ignores its batch.
  With t_start < 1, `noise` must already be x at t_start (SDEdit).
  """
  ts = shift_time(jnp.linspace(t_start, 0.0, num_steps + 1), shift)
  if stochasticity and rng_b is None:
    raise ValueError('stochastic sampling needs rng_b, one key per sample')

  def step(x, inputs):
    i, t_now, t_next = inputs
    v = velocity_fn(x, jnp.full((x.shape[0],), t_now))
    if not stochasticity:
      return x + (t_next - t_now) * v, None
    x0, e = x - t_now * v, x + (1 - t_now) * v
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(rng_b)
    e = jnp.sqrt(1 - stochasticity**2) * e + stochasticity * z
    return (1 - t_next) * x0 + t_next * e, None

  x, _ = jax.lax.scan(step, noise, (jnp.arange(num_steps), ts[:-1], ts[1:]))
  return x


def flow_edit(velocity_fn: Callable, x_src, *, num_steps: int, t_start: float, rng, shift: float = 1.0,
              noise_draws: int = 1):
  """FlowEdit (Kulikov et al., 2024): x_src carried to the target condition without inversion.

  velocity_fn(z_tar, z_src, t_b) -> (v_tar, v_src), the velocities under the target and the
  source condition. Each step draws fresh noise n, puts the source on its path z_src = (1 - t)
  x_src + t n, shifts the edit by the same amount, z_tar = z + z_src - x_src, and moves the edit
  by the difference v_tar - v_src. What both conditions agree on (layout, motion) cancels, so it
  stays; where the source is exactly the target's mode nothing moves. Starts at z = x_src and
  t_start (how much may change, as SDEdit's strength), ends at t = 0 on the same time grid as `sample`.
  `noise_draws` (the paper's n_avg): that many noises a step, their differences averaged; a steadier
  edit for that many model calls. rng: a key per sample [b], so a sample's noise ignores its batch.
  """
  ts = shift_time(jnp.linspace(t_start, 0.0, num_steps + 1), shift)

  def step(z, inputs):
    i, t_now, t_next = inputs
    # Draw j of step i takes key i * noise_draws + j (one draw a step is the single-draw FlowEdit); the
    # draws go through velocity_fn as one batch [noise_draws * b, ...].
    draw = lambda j, k: jax.random.normal(jax.random.fold_in(k, i * noise_draws + j), x_src.shape[1:], x_src.dtype)  # noqa: E731
    n = jax.vmap(lambda j: jax.vmap(lambda k: draw(j, k))(rng))(jnp.arange(noise_draws))  # [draws, b, ...]
    z_src = (1 - t_now) * x_src + t_now * n
    flat = lambda a: a.reshape((-1,) + x_src.shape[1:])  # noqa: E731
    v_tar, v_src = velocity_fn(flat(z + z_src - x_src), flat(z_src), jnp.full((n.shape[0] * n.shape[1],), t_now))
    dv = jnp.mean((v_tar - v_src).reshape(n.shape), axis=0)
    return z + (t_next - t_now) * dv, None

  z, _ = jax.lax.scan(step, x_src, (jnp.arange(num_steps), ts[:-1], ts[1:]))
  return z


def reconstruction_correction(x0_fn: Callable, x_t, x_given, mask_bt, t_b, scale):
  """Reconstruction guidance (Ho et al., 2022, "Video Diffusion Models"): what to subtract from the
  clean estimate of the generated frames, scale (1 - t) grad_x ||x0_fn(x_t) - x_given||^2 over the given frames.

  x0_fn(x_t) -> the clean estimate of the whole clip [b, T, ...] from x_t, whose given frames
  (`mask_bt` bool [b, T]) are on their noising path: the model is not shown them clean, so it
  redraws them from the whole clip. The gradient says how the generated frames must change for that
  redraw to match `x_given`, which ties their motion to the given frames'. (1 - t): weak at high
  noise, where the estimate is a blur.
  """
  m = mask_bt.reshape(mask_bt.shape + (1,) * (x_t.ndim - 2)).astype(x_t.dtype)
  grad = jax.grad(lambda x: jnp.sum(m * (x0_fn(x) - x_given) ** 2))(x_t)
  return scale * (1 - t_b).reshape((-1,) + (1,) * (x_t.ndim - 1)) * grad


def guidance(v_text, v_null, scale: float, v_no_frames=None, frame_scale: float = 1.0):
  """Classifier-free guidance from the velocities of the guidance branches.

  Text only: v = v_null + scale (v_text - v_null). With given frames (frame conditioning), v_text
  and v_null both see them and `v_no_frames` (the null caption without them) adds separate
  guidance toward the frames: v = v_no_frames + frame_scale (v_null - v_no_frames) + scale (v_text - v_null).
  """
  v = v_null + scale * (v_text - v_null)
  if v_no_frames is not None:
    v = v + (frame_scale - 1.0) * (v_null - v_no_frames)
  return v
