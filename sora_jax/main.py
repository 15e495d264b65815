r"""Train a text-to-video model:

  python -m sora_jax.main --config=configs/shapes.py --workdir=runs/shapes [--config.FIELD=VALUE ...]

Resumes from the latest checkpoint in --workdir; writes checkpoints/, metrics.jsonl, TensorBoard
events, samples/ and config.json there.
"""

import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sora_jax import UsageError, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.DEFINE_bool('overwrite', False, 'Start afresh: delete the checkpoints, metrics and samples of an '
                  'earlier run in --workdir (by default a run resumes, and a different model is refused).')
flags.mark_flags_as_required(['config', 'workdir'])


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


def quiet_library_logs():
  """Keeps INFO lines from sora_jax only (Orbax logs every file it writes); warnings pass."""
  import logging as std_logging
  handler = logging.get_absl_handler()
  handler.addFilter(lambda r: r.levelno >= std_logging.WARNING or '/sora_jax/' in r.pathname)


def main(argv):
  quiet_library_logs()
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  logging.info('JAX %s, process %d/%d, %d devices', jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    train.train_and_evaluate(load_config(), FLAGS.workdir, overwrite=FLAGS.overwrite)
  except (UsageError, train.NonFiniteError) as e:
    message = str(e).splitlines()[0]  # grain appends a note about its traceback filtering
    logging.error('%s', message)
    sys.exit(f'error: {message}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
