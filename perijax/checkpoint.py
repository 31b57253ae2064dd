"""Orbax checkpoints of a run: the train state and the data iterator, saved together, restorable onto any mesh.

WORKDIR/checkpoints/<step>/ holds `state` (the TrainState), `data` (the grain iterator's position, one file per
process) and `config` (the resolved config, JSON), and `checksums.json` (`Manager`): the size and CRC-32 of every file,
written once the save is complete. Resuming and evaluating verify every file against it and never restore a damaged
step. No RNG state: nothing in a step is random, the init comes from config.train.seed, the data order from `data`.
"""

import glob
import json
import os
import re
import shutil
import zlib

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from perijax import rundir
from perijax.errors import UserError

MANIFEST = 'checksums.json'
# Orbax rewrites these as it renames a finished step into place (commit time): bookkeeping, not data.
_REWRITTEN_AT_RENAME = ('_CHECKPOINT_METADATA', 'commit_success.txt')


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, incomplete or does not fit the config."""


class DamagedCheckpointError(CheckpointError):
  """A step's files are missing, truncated or changed since the save."""


class IncompleteCheckpointError(DamagedCheckpointError):
  """A step has no checksums.json: its save never finished (or is finishing right now)."""


def checkpoint_dir(workdir):
  return rundir.checkpoints(workdir)


def _checksums(step_dir):
  """{relative path: [bytes, crc32]} of every file of a step but the manifest; CRC-32 runs at GB/s, streamed."""
  sums = {}
  for root, _, files in os.walk(step_dir):
    for path in (os.path.join(root, name) for name in files):
      relative = os.path.relpath(path, step_dir)
      if not relative.startswith(MANIFEST) and relative not in _REWRITTEN_AT_RENAME:
        crc = 0
        with open(path, 'rb') as f:
          while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
        sums[relative] = [os.path.getsize(path), crc]
  return dict(sorted(sums.items()))


def write_manifest(step_dir):
  temporary = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(temporary, 'w') as f:
    json.dump({'files': _checksums(step_dir)}, f)
  os.replace(temporary, os.path.join(step_dir, MANIFEST))


def verify(directory, step):
  """Raises DamagedCheckpointError (IncompleteCheckpointError: no manifest) naming the step, its path and the file."""
  if not rundir.is_local(directory):  # gs:// and other remote stores: Orbax's own guarantees only
    return
  step_dir = os.path.join(str(directory), str(step))
  manifest = os.path.join(step_dir, MANIFEST)
  if not os.path.isfile(manifest):
    if not glob.glob(os.path.join(glob.escape(str(directory)), '*', MANIFEST)):
      return  # a run from before perijax wrote checksums: Orbax's atomic rename is all there is to go by
    raise IncompleteCheckpointError(f'checkpoint {step} at {step_dir} is incomplete: it has no {MANIFEST}, written '
                                    'once a save has finished (the process stopped while saving?)')
  try:
    with open(manifest) as f:
      expected = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as error:
    raise DamagedCheckpointError(f'checkpoint {step} at {step_dir} is damaged: {manifest} is unreadable '
                                 f'({error})') from None
  actual = _checksums(step_dir)
  for relative, (size, crc) in expected.items():
    problem = ('is missing' if relative not in actual else
               f'has {actual[relative][0]} bytes, {size} when saved (truncated?)' if actual[relative][0] != size else
               'has changed since the save (checksum mismatch)' if actual[relative][1] != crc else None)
    if problem:
      raise DamagedCheckpointError(f'checkpoint {step} at {step_dir} is damaged: {relative} {problem}')


class Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager that writes a step's checksums.json once its save is complete: an asynchronous save's
  in Orbax's post-finalization callback, into the still temporary directory, so that it appears with the step when
  Orbax renames it into place; a synchronous one's (and any the callback missed) right after."""

  def __init__(self, directory, options, item_names):
    self._unsealed, self._saving = None, False
    if options.enable_async_checkpointing:
      options.async_options = ocp.AsyncOptions(post_finalization_callback=self._seal)
    super().__init__(directory, options=options, item_names=item_names)

  def save(self, step, *args, **kwargs):
    self.wait_until_finished()  # the previous save is sealed before this one is named
    self._unsealed, self._saving = step, True
    try:
      saved = super().save(step, *args, **kwargs)  # calls wait_until_finished itself: not the time to seal
    finally:
      self._saving = False
    if not self._options.enable_async_checkpointing:
      self._seal()
    return saved

  def wait_until_finished(self):
    super().wait_until_finished()
    if not self._saving:
      self._seal()

  def _seal(self):
    step, self._unsealed = self._unsealed, None
    if step is None or jax.process_index() != 0 or not rundir.is_local(self.directory):
      return
    final = os.path.join(str(self.directory), str(step))
    temporary = sorted(glob.glob(glob.escape(final) + '.orbax-checkpoint-tmp*'))
    write_manifest(temporary[-1] if temporary and not os.path.isdir(final) else final)


def make_manager(workdir, checkpoint_config=None, read_only=False):
  c = checkpoint_config
  options = ocp.CheckpointManagerOptions(
      max_to_keep=c.keep if c else None,
      keep_period=(c.keep_period or None) if c else None,  # never deleted: evaluate --watch may reach them late
      enable_async_checkpointing=bool(c and c.async_save), create=not read_only, read_only=read_only)
  return Manager(checkpoint_dir(workdir), options=options, item_names=('state', 'data', 'config'))


def resume_step(manager, workdir, resume_from_intact=False):
  """The newest intact step to resume from (None: none, start afresh).

  Newer steps whose save never finished are set aside; a damaged newer step stops with an error naming it and the
  newest intact one, unless `resume_from_intact`. Steps set aside move to WORKDIR/checkpoints_damaged/ (kept).
  """
  chosen, set_aside, damage = None, [], None
  # Process 0 reads every file of the steps it checks; the others take its verdict (on a pod the steps are on one
  # shared file system, and each host reading a whole multi-GB checkpoint again is minutes of I/O for nothing).
  for step in sorted(manager.all_steps(), reverse=True) if jax.process_index() == 0 else ():
    try:
      verify(manager.directory, step)
      chosen = step
      break
    except DamagedCheckpointError as error:
      if not isinstance(error, IncompleteCheckpointError):
        damage = damage or error
      set_aside.append((step, error))
  damaged_dir = str(rundir.damaged_checkpoints(workdir))  # local: checksums are only checked on local stores
  moves_steps = bool(set_aside)
  if jax.process_count() > 1:
    chosen, moves_steps, damaged = _from_process_0(chosen, moves_steps, damage is not None)
    if damaged and damage is None:
      damage = DamagedCheckpointError(f'process 0 found a damaged checkpoint in {manager.directory} (its log names '
                                      'the step and the file)')
  if damage is not None and not resume_from_intact:
    newest = (f'the newest intact one is step {chosen}; rerun with --resume_from_intact to resume from it'
              if chosen is not None else 'no intact checkpoint remains; rerun with --resume_from_intact to start '
              'afresh')
    raise DamagedCheckpointError(f'{damage}; {newest} (damaged steps are moved to {damaged_dir}, not deleted)')
  if moves_steps:
    if jax.process_index() == 0:
      os.makedirs(damaged_dir, exist_ok=True)
      for step, error in set_aside:
        print(f'{error}; moved to {damaged_dir}/{step}', flush=True)
        target = os.path.join(damaged_dir, str(step))
        while os.path.exists(target):  # the same step set aside before: keep both
          target += '_'
        shutil.move(os.path.join(str(manager.directory), str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('perijax_checkpoints_set_aside')
    manager.reload()
  return chosen


def _from_process_0(chosen, any_set_aside, damaged):
  """Process 0's (chosen step or None, whether it set steps aside, whether one was damaged), on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  verdict = multihost_utils.broadcast_one_to_all(np.array([-1 if chosen is None else chosen, any_set_aside, damaged],
                                                          np.int64))
  return (None if verdict[0] < 0 else int(verdict[0])), bool(verdict[1]), bool(verdict[2])


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


def data_process_count(step_dir):
  """How many processes saved a step's data iterator (grain: data/process_{i}-of-{n}.json each); None: none."""
  names = (re.fullmatch(r'process_\d+-of-(\d+)\.json', path.name) for path in (step_dir / 'data').glob('process_*'))
  counts = {int(name.group(1)) for name in names if name}
  return max(counts) if counts else None


def restore(manager, step, abstract_state, shardings, data_iterator=None):
  """Restores `step` onto the mesh of `shardings`; the data iterator (if given) resumes where it was saved.

  Each process saves its own iterator position, so a run resumes on the process count that saved it; an iterator
  whose `state_is_global` (the same on every process: data.process_split=rows) resumes on any, from process 0's."""
  items = {'state': ocp.args.StandardRestore(abstract_with_shardings(abstract_state, shardings))}
  step_dir = epath.Path(manager.directory) / str(step)
  saved_by = data_process_count(step_dir) if data_iterator is not None else None
  from_process_0 = saved_by not in (None, jax.process_count())
  if from_process_0 and not getattr(data_iterator, 'state_is_global', False):
    raise CheckpointError(f'checkpoint {step} in {manager.directory} was written by {saved_by} processes and this run '
                          f'has {jax.process_count()}: each saved its own data position, so resume it with {saved_by} '
                          'processes (a config.data.process_split=rows run resumes on any process count)')
  if data_iterator is not None and not from_process_0:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    state = manager.restore(step, args=ocp.args.Composite(**items))['state']
  except (ValueError, KeyError, TypeError) as error:
    raise CheckpointError(f'checkpoint {step} in {manager.directory} does not match this config: '
                          f'{str(error).splitlines()[0][:300]}') from error
  if from_process_0:
    data_iterator.set_state(json.loads((step_dir / 'data' / f'process_0-of-{saved_by}.json').read_text()))
  return state
