"""Orbax checkpoints of a run: the train state and the data iterator, saved together, restorable onto any mesh.

WORKDIR/checkpoints/<step>/ holds three items: `state` (params, optimizer state, loss-scale state, step and the run's
counters), `data` (the grain iterator's position, one file per process) and `config` (the run's resolved config, JSON). Orbax writes each checkpoint into a
temporary directory and renames it only once complete, so a crash mid-save never leaves something that looks finished.
There is no RNG state to keep: nothing in a step is random (no dropout), the initialisation comes from
config.train.seed and the data order from the iterator state.
"""

import json

import grain
import jax
import orbax.checkpoint as ocp

from perijax import rundir


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not fit the config."""


def checkpoint_dir(workdir):
  return rundir.checkpoints(workdir)


def make_manager(workdir, checkpoint_config=None, read_only=False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=checkpoint_config.keep if checkpoint_config else None,
      # Steps that are multiples of keep_period are never deleted (evaluate --watch may reach them late).
      keep_period=(checkpoint_config.keep_period or None) if checkpoint_config else None,
      enable_async_checkpointing=bool(checkpoint_config and checkpoint_config.async_save),
      create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=('state', 'data', 'config'))


def save(manager, step, state, data_iterator=None, config=None):
  """Starts writing (asynchronously when configured); `manager.wait_until_finished()` blocks until it is complete."""
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  if config is not None:
    items['config'] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def abstract_with_shardings(abstract_state, shardings):
  """The restore target: shapes and dtypes of the current code, laid out on the current mesh (any split)."""
  return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                      abstract_state, shardings)


def restore(manager, step, abstract_state, shardings, data_iterator=None):
  """Restores `step` onto the mesh of `shardings`; the data iterator (if given) resumes where it was saved."""
  items = {'state': ocp.args.StandardRestore(abstract_with_shardings(abstract_state, shardings))}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as error:
    raise CheckpointError(f'checkpoint {step} in {manager.directory} does not match this config: '
                          f'{str(error).splitlines()[0][:300]}') from error
  return restored['state']
