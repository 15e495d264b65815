"""The optimizer from the config: warmup + cosine schedule, global-norm clipping, AdamW; and EMA."""

import jax
import jax.numpy as jnp
import optax
from absl import logging


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
  warmup = min(opt_config.warmup_steps, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_config.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_config.learning_rate * opt_config.final_lr_fraction)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
  # Norms, biases and embeddings are not decayed.
  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and 'embedding' not in jax.tree_util.keystr(path), params)

  return optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(opt_config, total_steps), b1=opt_config.b1,
                  b2=opt_config.b2, weight_decay=opt_config.weight_decay, mask=decay_mask),
  )


def ema_decay_at(decay: float, step):
  """The EMA's decay at step n: `decay`, warmed up as (1 + n) / (10 + n), which reaches it only at
  n = (10 * decay - 1) / (1 - decay) (0.998: step 4490); shorter runs never use `decay` itself."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def log_ema_warmup(decay: float, total_steps: int) -> None:
  """Says so when a run ends before its EMA reaches `decay`: an override of it would change nothing."""
  last = float(ema_decay_at(decay, total_steps - 1))
  if last < decay:
    logging.info('EMA: the decay warms up as (1 + step) / (10 + step) and reaches ema_decay=%s only after this '
                 'run (%.4f at its last step)', decay, last)


def ema_update(ema, params, decay: float, step):
  """ema <- d * ema + (1 - d) * params, d = ema_decay_at(decay, step)."""
  decay = ema_decay_at(decay, step)
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
