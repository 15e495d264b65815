import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.diffusion import rectified_flow as rf


def test_loss_is_zero_for_the_true_velocity_and_for_the_true_x0():
  key = jax.random.key(0)
  x0, noise = jax.random.normal(key, (2, 4, 3, 3, 3)), jax.random.normal(jax.random.key(1), (2, 4, 3, 3, 3))
  t = jnp.array([0.3, 0.8])
  loss_v, _ = rf.loss(lambda x_t, t_b: noise - x0, x0, noise, t, prediction_type='velocity')
  loss_x0, _ = rf.loss(lambda x_t, t_b: x0, x0, noise, t, prediction_type='x0')
  assert float(loss_v) == pytest.approx(0.0, abs=1e-10)
  assert float(loss_x0) == pytest.approx(0.0, abs=1e-8)
  loss_bad, _ = rf.loss(lambda x_t, t_b: jnp.zeros_like(x_t), x0, noise, t, prediction_type='velocity')
  assert float(loss_bad) > 0.5


def test_euler_sampler_carries_noise_to_a_point_target_along_the_optimal_flow():
  target = jnp.array([[1.5, -2.0, 0.25]])
  # For data concentrated at one point, the optimal velocity is (x_t - target) / t.
  velocity = lambda x, t_b: (x - target) / t_b[:, None]
  noise = jax.random.normal(jax.random.key(0), (1, 3))
  out = rf.sample(velocity, noise, num_steps=7, shift=3.0)
  np.testing.assert_allclose(out, target, atol=1e-5)


def test_euler_sampler_learns_nothing_it_is_not_told_two_point_mixture():
  """With the exact velocity of a two-point mixture, samples land on one of the two points."""
  points = jnp.array([-1.0, 2.0])

  def velocity(x, t_b):  # E[noise - x0 | x_t] for x0 uniform on `points`
    t = t_b[:, None]
    logits = -((x - (1 - t) * points[None]) ** 2) / (2 * t**2)
    w = jax.nn.softmax(logits, axis=-1)
    x0_hat = (w * points[None]).sum(-1, keepdims=True)
    return (x - x0_hat) / t

  noise = jax.random.normal(jax.random.key(0), (256, 1))
  out = np.asarray(rf.sample(velocity, noise, num_steps=200))
  assert np.all(np.min(np.abs(out - np.array([-1.0, 2.0])), axis=1) < 0.05)
  assert 0.3 < np.mean(out > 0.5) < 0.7


def test_guidance_scale_one_is_the_conditional_velocity_and_zero_the_unconditional():
  v_text, v_null, v_bare = jnp.array([2.0, 3.0]), jnp.array([0.5, 0.5]), jnp.array([0.1, -0.2])
  np.testing.assert_allclose(rf.guidance(v_text, v_null, 1.0), v_text)
  np.testing.assert_allclose(rf.guidance(v_text, v_null, 0.0), v_null)
  np.testing.assert_allclose(rf.guidance(v_text, v_null, 3.0), 0.5 + 3 * (v_text - 0.5))
  # Frame guidance 1 adds nothing; 0 drops the frames' effect from the null branch.
  np.testing.assert_allclose(rf.guidance(v_text, v_null, 2.0, v_bare, 1.0), rf.guidance(v_text, v_null, 2.0))
  np.testing.assert_allclose(rf.guidance(v_text, v_null, 1.0, v_bare, 0.0), v_text - v_null + v_bare)


def test_timesteps_are_in_range_and_the_high_noise_share_is_respected():
  t = rf.sample_time(jax.random.key(0), 20000, high_noise_fraction=0.3, high_noise_min=0.8)
  assert float(t.min()) > 0 and float(t.max()) <= 1
  # logit-normal(0, 1) puts about 13% above 0.8; with 30% uniform on (0.8, 1) it is about 39%.
  assert 0.35 < float(jnp.mean(t > 0.8)) < 0.43
  shifted = rf.sample_time(jax.random.key(0), 20000, shift=3.0)
  assert float(jnp.mean(shifted)) > float(jnp.mean(rf.sample_time(jax.random.key(0), 20000))) + 0.1


def test_stochastic_sampler_is_euler_at_zero_and_still_reaches_a_point_target():
  target = jnp.array([[1.5, -2.0, 0.25], [0.0, 1.0, -1.0]])
  velocity = lambda x, t_b: (x - target) / t_b[:, None]
  noise = jax.random.normal(jax.random.key(0), (2, 3))
  keys = jax.random.split(jax.random.key(1), 2)
  euler = rf.sample(velocity, noise, num_steps=7, shift=3.0)
  np.testing.assert_allclose(rf.sample(velocity, noise, num_steps=7, shift=3.0, stochasticity=0.0, rng_b=keys),
                             euler)
  # Fresh noise changes the path but not where the exact flow ends.
  for eta in (0.5, 1.0):
    np.testing.assert_allclose(rf.sample(velocity, noise, num_steps=7, stochasticity=eta, rng_b=keys), target,
                               atol=1e-5)
  with pytest.raises(ValueError, match='rng_b'):
    rf.sample(velocity, noise, num_steps=7, stochasticity=0.5)


def test_stochastic_sampler_still_samples_both_modes_of_a_two_point_mixture():
  points = jnp.array([-1.0, 2.0])

  def velocity(x, t_b):
    t = t_b[:, None]
    w = jax.nn.softmax(-((x - (1 - t) * points[None]) ** 2) / (2 * t**2), axis=-1)
    return (x - (w * points[None]).sum(-1, keepdims=True)) / t

  noise = jax.random.normal(jax.random.key(0), (256, 1))
  keys = jax.random.split(jax.random.key(1), 256)
  out = np.asarray(rf.sample(velocity, noise, num_steps=100, stochasticity=0.5, rng_b=keys))
  assert np.all(np.min(np.abs(out - np.array([-1.0, 2.0])), axis=1) < 0.05)
  assert 0.3 < np.mean(out > 0.5) < 0.7


def test_flow_edit_carries_a_point_source_to_a_point_target_exactly_whatever_the_noise():
  # Source data: the point a; target data: the point b. Their exact velocities v = (x_t - x0) / t make
  # FlowEdit's update (z - b) / t, whose Euler steps land on b at t = 0 from any start time.
  a, b = jnp.array([[1.0, -2.0]]), jnp.array([[3.0, 0.5]])
  velocities = lambda z_tar, z_src, t_b: ((z_tar - b) / t_b[:, None], (z_src - a) / t_b[:, None])  # noqa: E731
  for t_start, seed in ((0.9, 0), (0.5, 1)):
    out = rf.flow_edit(velocities, a, num_steps=7, t_start=t_start, rng=jax.random.split(jax.random.key(seed), 1))
    np.testing.assert_allclose(out, b, atol=1e-5)
  # Where source and target agree, nothing moves.
  same = lambda z_tar, z_src, t_b: ((z_tar - a) / t_b[:, None], (z_src - a) / t_b[:, None])  # noqa: E731
  np.testing.assert_allclose(rf.flow_edit(same, a, num_steps=5, t_start=0.8, rng=jax.random.split(jax.random.key(0), 1)),
                             a, atol=1e-5)


def test_flow_edit_averages_its_noise_draws_so_the_edit_varies_less():
  # A velocity difference that is the noise itself (v_tar - v_src = n): each step moves the edit by
  # dt times the mean of its draws, so the spread over samples shrinks as 1 / sqrt(draws).
  x = jnp.zeros((2000, 1))
  noisy = lambda z_tar, z_src, t_b: (z_src / t_b[:, None], 0.0 * z_src)  # noqa: E731
  rng = jax.random.split(jax.random.key(0), 2000)
  spread = {d: float(jnp.std(rf.flow_edit(noisy, x, num_steps=4, t_start=1.0, rng=rng, noise_draws=d)))
            for d in (1, 4)}
  assert abs(spread[1] - 0.5) < 0.03 and abs(spread[4] / spread[1] - 0.5) < 0.06, spread  # 4 steps of 0.25
  # One draw a step is the single-draw FlowEdit, noise for noise: key i at step i.
  one = rf.flow_edit(noisy, x[:3], num_steps=4, t_start=1.0, rng=rng[:3], noise_draws=1)
  by_hand = sum(-0.25 * jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), (1,)))(rng[:3]) for i in range(4))
  np.testing.assert_allclose(one, by_hand, atol=1e-6)


def test_reconstruction_correction_is_the_scaled_gradient_of_the_given_frames_redraw_error():
  # A linear "model" that mixes frames, x0 = A x along time: the gradient of ||m (A x - g)||^2 is
  # 2 A^T m (A x - g), scaled by scale (1 - t); generated frames move only through the mixing.
  b, T = 2, 4
  A = jax.random.normal(jax.random.key(0), (T, T))
  x = jax.random.normal(jax.random.key(1), (b, T, 3, 3, 2))
  g = jax.random.normal(jax.random.key(2), (b, T, 3, 3, 2))
  mask_bt = jnp.array([[True, True, False, False], [False, False, True, True]])
  t_b = jnp.array([0.25, 0.75])
  x0_fn = lambda x: jnp.einsum('st,bt...->bs...', A, x)  # noqa: E731
  got = rf.reconstruction_correction(x0_fn, x, g, mask_bt, t_b, 3.0)
  m = mask_bt[:, :, None, None, None]
  expected = 2 * jnp.einsum('st,bs...->bt...', A, m * (x0_fn(x) - g)) * (3.0 * (1 - t_b))[:, None, None, None, None]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # A model that never mixes frames gives generated frames no correction; at t = 1 nothing moves.
  local = rf.reconstruction_correction(lambda x: 2 * x, x, g, mask_bt, t_b, 3.0)
  assert float(jnp.abs(jnp.where(m, 0.0, local)).max()) == 0.0 and float(jnp.abs(local).max()) > 0
  assert float(jnp.abs(rf.reconstruction_correction(x0_fn, x, g, mask_bt, jnp.ones(2), 3.0)).max()) == 0.0
