"""A thin Orbax CheckpointManager: train state, EMA parameters and the grain iterator state.

Items of one checkpoint step:
  'train_state': {'step', 'params', 'opt_state'}   restored to resume training
  'ema':         EMA parameters                    all that sampling needs
  'data':        the grain iterator state of this process
Writes go to a temporary directory that Orbax renames on commit, so a crash mid-save leaves the
previous step as the latest.
"""

import os

import grain
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         create=not read_only, read_only=read_only,
                                         cleanup_tmp_directories=not read_only,  # what a crash left
                                         enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: dict, data_iter=None) -> bool:
  """Starts an async save of the train state (+EMA, +iterator); returns whether one was started."""
  items = dict(train_state=ocp.args.StandardSave({k: v for k, v in state.items() if k != 'ema'}),
               ema=ocp.args.StandardSave(state['ema']))
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: dict, data_iter=None) -> dict:
  """Restores the train state onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
  abstract_train = {k: v for k, v in abstract_state.items() if k != 'ema'}
  items = dict(train_state=ocp.args.StandardRestore(abstract_train),
               ema=ocp.args.StandardRestore(abstract_state['ema']))
  if data_iter is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return dict(restored['train_state'], ema=restored['ema'])


def restore_ema(mngr: ocp.CheckpointManager, step: int, abstract_ema):
  """Only the EMA parameters (what sampling uses)."""
  restored = mngr.restore(step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(abstract_ema)))
  return restored['ema']
