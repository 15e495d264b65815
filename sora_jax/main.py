r"""Train a text-to-video model:

  python -m sora_jax.main --config=configs/shapes.py --workdir=runs/shapes [--config.FIELD=VALUE ...]

Resumes from the latest checkpoint in --workdir; writes checkpoints/, metrics.jsonl, TensorBoard
events, samples/ and config.json there.

Multi-process (multi-host) runs start the same command once per process, with the same --workdir
(a shared file system, or gs:// on TPU pods):
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I   explicit (any cluster; on
      CPU the processes talk through gloo: see experiments/launch_local.py)
  --distributed    let JAX discover the cluster: Cloud TPU VMs (run on every worker) and SLURM
      (one task per node under srun); see experiments/launch/.
Without these flags the run is one process over the local devices.
"""

import gc
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sora_jax import UsageError, init_devices, quiet_library_logs, train, train_vae

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_bool('overwrite', False, 'Start afresh: delete the checkpoints, metrics and samples of an '
                  'earlier run in --workdir (by default a run resumes, and a different model is refused).')
flags.DEFINE_bool('distributed', False, 'Multi-process run: call jax.distributed.initialize() and let JAX '
                  'discover the processes (Cloud TPU VMs, SLURM); implied by --coordinator_address.')
flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 in a multi-process run.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, num_processes).')
flags.DEFINE_integer('heartbeat_timeout_s', 100, 'Multi-process: a process silent this long counts as dead '
                     'and the others stop with an error instead of waiting for it.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed():
  """jax.distributed.initialize from the flags (before anything touches a device); no flags: nothing."""
  explicit = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                  process_id=FLAGS.process_id)
  given = [name for name, value in explicit.items() if value is not None]
  if not given and not FLAGS.distributed:
    return
  if FLAGS.coordinator_address and len(given) < 3:
    missing = sorted(set(explicit) - set(given))
    sys.exit(f'error: --coordinator_address needs --{" and --".join(missing)} too')
  if FLAGS.num_processes is not None and FLAGS.process_id is not None \
      and not 0 <= FLAGS.process_id < FLAGS.num_processes:
    sys.exit(f'error: --process_id={FLAGS.process_id} is not in [0, --num_processes={FLAGS.num_processes})')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU devices of several processes
  jax.distributed.initialize(**{k: v for k, v in explicit.items() if v is not None},
                             heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_s)


def parse_flags(argv):
  """absl's parser, with a bad config file, variant or field reported in one line (no traceback)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:  # its message may hold the config file's traceback: keep the last line
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f'error: {lines[0]} {lines[-1]}' if len(lines) > 1 else f'error: {e}')
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.FIELD
    name = re.search(r"'(\w+)", str(e))
    guess = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(f"error: unknown config field '{name.group(1) if name else e}'"
             + (f' (did you mean "{guess.group(1)}"?)' if guess else ''))
  except Exception as e:  # noqa: BLE001 -- e.g. the config file's get_config(arg) refused its arg
    sys.exit(f'error: {type(e).__name__}: {str(e).strip()}')


def load_config():
  """FLAGS.config, whose file is loaded on first access; a file that fails is one line."""
  try:
    config = FLAGS.config
    config.keys()  # a file that failed to load raises only when its config is first used
    return config
  except Exception as e:  # noqa: BLE001 -- any failure of the user's config file
    cause = e.__cause__ or e
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    path = next((arg.split('=', 1)[1] for arg in sys.argv if arg.startswith('--config=')), '')
    sys.exit(f'error: --config={path}: {lines[-1] if lines else type(cause).__name__}')


def main(argv):
  # Tracing and lowering the step make millions of short-lived objects: Python's default thresholds
  # (a collection per 700 allocations) took ~5% of a tiny run's wall time here.
  gc.set_threshold(100_000, 50, 100)
  quiet_library_logs()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  initialize_distributed()
  init_devices()
  logging.info('JAX %s, process %d/%d, %d devices', jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    config = load_config()
    if train_vae.IS_VAE(config):  # configs/vae_shapes.py: the video autoencoder
      train_vae.train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    else:
      train.train_and_evaluate(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
  except (UsageError, train.NonFiniteError) as e:
    message = str(e).splitlines()[0]  # grain appends a note about its traceback filtering
    logging.error('%s', message)
    exit_now(f'error: {message}')
  except Exception:  # noqa: BLE001 -- multi-process: see exit_now
    if jax.process_count() == 1:
      raise
    logging.exception('process %d failed', jax.process_index())
    exit_now('error: see the traceback above')


def exit_now(message: str):
  """Exits with code 1. A failed process of a multi-process run exits at once: JAX's shutdown would
  wait (minutes) at a barrier for peers that may be blocked on this very process; the peers then
  fail fast in their next collective or miss its heartbeat (--heartbeat_timeout_s)."""
  if jax.process_count() == 1:
    sys.exit(message)
  print(message, file=sys.stderr, flush=True)
  logging.flush()
  os._exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
