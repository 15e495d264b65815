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


# What libtpu prints when it is installed (the 'tpu' extra, for ahead-of-time TPU compiles) on a machine
# without TPUs: JAX's first device query loads it, it complains about these, and JAX goes on without it.
_LIBTPU_NOISE = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'Logging before InitGoogle()',
                 '=== Source Location Trace: ===', 'libtpu_init_utils.cc')


def init_devices() -> None:
  """Starts JAX's backends (what the first device query does; after `jax.distributed.initialize`).

  Where libtpu is installed but the machine has no TPU, libtpu's complaints (`_LIBTPU_NOISE`, five
  lines on every run) are dropped from stderr; anything else written meanwhile is passed on."""
  import os
  import sys
  import tempfile
  import jax
  try:
    from jax._src import cloud_tpu_init, hardware_utils
    quiet = (not os.environ.get('JAX_PLATFORMS') and cloud_tpu_init.get_tpu_library_path() is not None
             and hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0)
  except Exception:  # noqa: BLE001 -- private modules: if they move, just start the backends
    quiet = False
  if not quiet:
    jax.devices()
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      jax.devices()
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors='replace').splitlines()
      kept = [line for line in lines if not any(noise in line for noise in _LIBTPU_NOISE)]
      if kept:
        print('\n'.join(kept), file=sys.stderr, flush=True)
