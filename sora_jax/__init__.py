"""sora_jax: Sora-style text-to-video diffusion transformers in JAX/Flax."""


class UsageError(ValueError):
  """Bad user input (config, flags, paths): reported as one line, without a traceback."""


def ensure_writable_dir(directory: str, flag: str) -> None:
  """Creates `directory` and writes a probe file there; a UsageError naming `flag` if either fails."""
  import os
  import tempfile
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise UsageError(f'{flag}: cannot write to {directory}: {e.strerror or e}') from None


# Orbax warnings that tell a user nothing: a restore opens the checkpoints read-only, and Orbax registers
# its own jax.Array handler twice.
_ORBAX_NOISE = ('Given directory is read only', 'Type handler registry type')


def quiet_library_logs() -> None:
  """Keeps absl INFO lines from sora_jax only (Orbax logs every file it reads or writes); warnings pass,
  but for `_ORBAX_NOISE`."""
  import logging
  from absl import logging as absl_logging

  def keep(record) -> bool:
    if '/orbax/' in record.pathname and str(record.msg).startswith(_ORBAX_NOISE):
      return False
    return record.levelno >= logging.WARNING or '/sora_jax/' in record.pathname
  absl_logging.get_absl_handler().addFilter(keep)
