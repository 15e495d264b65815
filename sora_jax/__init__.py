"""sora_jax: Sora-style text-to-video diffusion transformers in JAX/Flax."""


class UsageError(ValueError):
  """Bad user input (config, flags, paths): reported as one line, without a traceback."""
