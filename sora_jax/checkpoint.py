"""A thin Orbax CheckpointManager: train state and EMA parameters.

Items of one checkpoint step:
  'train_state': {'step', 'params', 'opt_state'}   restored to resume training
  'ema':         EMA parameters                    all that sampling needs
The data order is a function of the step (`sora_jax.data.pipeline`), so no iterator state is
saved and a checkpoint resumes on any number of processes. In a multi-process run every process
writes its own shards. Writes go to a temporary directory that Orbax renames on commit, so a crash
mid-save leaves the previous step as the latest.
"""

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  if jax.devices()[0].platform == 'cpu':
    # Orbax splits each replicated array's write among its replicas (on by default except on GPU):
    # on CPU they share one host's memory, so it only costs a compile per slice shape (~7 s of the
    # first save of the tiny config on 8 devices). Process-wide: orbax reads its global registry.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else max_to_keep,
                                         save_interval_steps=0 if read_only else 1,  # orbax's read-only values
                                         create=not read_only, read_only=read_only,
                                         cleanup_tmp_directories=not read_only,  # what a crash left
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict) -> bool:
  """Starts an async save of the train state and EMA; returns whether one was started."""
  items = dict(train_state=ocp.args.StandardSave({k: v for k, v in state.items() if k != 'ema'}),
               ema=ocp.args.StandardSave(state['ema']))
  return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> dict:
  """Restores the train state onto the shardings of `abstract_state` (ShapeDtypeStructs), which
  may be another mesh or process count than the one that saved it."""
  abstract_train = {k: v for k, v in abstract_state.items() if k != 'ema'}
  items = dict(train_state=ocp.args.StandardRestore(abstract_train),
               ema=ocp.args.StandardRestore(abstract_state['ema']))
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return dict(restored['train_state'], ema=restored['ema'])


def restore_ema(mngr: ocp.CheckpointManager, step: int, abstract_ema):
  """Only the EMA parameters (what sampling uses)."""
  restored = mngr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema)))
  return restored['ema']


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
  """Only the raw (not averaged) parameters of the train state: no optimizer state is read."""
  args = ocp.args.PyTreeRestore({'params': abstract_params}, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args({'params': abstract_params}))
  restored = mngr.restore(step, args=ocp.args.Composite(train_state=args))
  return restored['train_state']['params']
