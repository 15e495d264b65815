r"""Train a text-to-video model:

  python -m sora_jax.main --config=configs/shapes.py --workdir=runs/shapes [--config.FIELD=VALUE ...]

Resumes from the latest checkpoint in --workdir; writes checkpoints/, metrics.jsonl, TensorBoard
events, samples/ and config.json there.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sora_jax import UsageError, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:variant]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and samples.')
flags.mark_flags_as_required(['config', 'workdir'])


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
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except UsageError as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
