"""Evaluation of a run's checkpoints: which ones, now or as training writes them (`run`). The command line, and what
its results hold, is `__main__.py` (`python -m perijax.evaluate`); `eval_lib.py` evaluates one checkpoint.

    results = run(workdir, step=None, evaluate_all=False, watch=False, overrides=['--config.eval.tasks=piqa'])
"""

import time

import jax
import numpy as np

from perijax import checkpoint as checkpoint_lib
from perijax import cli
from perijax import rundir
from perijax import tasks as tasks_lib
from perijax.errors import NotFoundError
from perijax.evaluate import eval_lib
from perijax.progress import progress, write as log  # log: below any progress bar, not through it


class EvaluationError(cli.UserError, ValueError):
  """Bad input to the evaluation (the message says what is wrong and what is allowed)."""


def _evaluated(workdir, step):
  return rundir.eval_result(workdir, step).is_file()


def prepare(workdir, overrides=()):
  """The run's config with the overrides, checked; raises before anything is built."""
  if not rundir.root(workdir).is_dir():
    raise NotFoundError(f'workdir {workdir} does not exist (pass the --workdir of a perijax.train run)')
  cli.check_writable_dir(workdir)  # results go to WORKDIR/eval/
  config = eval_lib.apply_overrides(eval_lib.load_run_config(workdir), overrides)
  tasks_lib.validate_task_names(config.eval.tasks)
  return config


def choose_steps(workdir, steps, step=None, evaluate_all=False):
  """The steps to evaluate now: `step`, every one not yet evaluated, or the latest."""
  where = checkpoint_lib.checkpoint_dir(workdir)
  if not steps:
    raise EvaluationError(f'no checkpoint in {where} (training writes one every config.checkpoint.every steps and at '
                          'the end)')
  if step is not None and step not in steps:
    raise EvaluationError(f'no checkpoint at step {step} in {where}; the checkpoints there are at steps '
                          f'{", ".join(map(str, steps))}')
  if step is not None:
    return [step]
  return [s for s in steps if not _evaluated(workdir, s)] if evaluate_all else [max(steps)]


def evaluate_and_write(evaluator, step):
  result = evaluator.evaluate(step)
  eval_lib.write_result(evaluator.workdir, result, lm_eval=(evaluator.config, evaluator.task_split_sizes))
  tasks = '  '.join(f'{name} acc {r["acc"]:.3f} acc_norm {r["acc_norm"]:.3f} (n={r["n"]})'
                    for name, r in result['tasks'].items())
  log(f'step {step}: loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  bits/byte '
      f'{result["bits_per_byte"]:.4f}  tokens {result["tokens"]}  {tasks}  '
      f'-> {rundir.eval_result(evaluator.workdir, step)}')
  return result


def run(workdir, *, step=None, evaluate_all=False, watch=False, overrides=(), poll_seconds=60.0,
        timeout_seconds=3600.0, devices=None):
  """Evaluates as the command line says; returns the results written, in step order. Raises on bad input."""
  if sum([step is not None, evaluate_all, watch]) > 1:
    raise EvaluationError('give at most one of --step, --all and --watch')
  if watch:
    return watch_checkpoints(workdir, overrides, devices, poll_seconds, timeout_seconds)
  config = prepare(workdir, overrides)
  steps = []  # the finished checkpoints: Orbax lists only completely written ones
  if rundir.checkpoints(workdir).is_dir():
    steps = list(checkpoint_lib.make_manager(workdir, read_only=True).all_steps())
  # Every process checks the request; all then evaluate process 0's choice, whatever each saw on disk.
  chosen = from_process_0(choose_steps(workdir, steps, step, evaluate_all))
  if not chosen:
    log(f'every checkpoint in {checkpoint_lib.checkpoint_dir(workdir)} is already evaluated '
        f'(steps {", ".join(map(str, steps))}); nothing to do')
    return []
  evaluator = _make_evaluator(workdir, config, devices)
  for chosen_step in list(chosen):  # every chosen checkpoint is checked before the first result is written
    try:
      evaluator.check_checkpoint(chosen_step)
    except checkpoint_lib.DamagedCheckpointError as error:
      if not evaluate_all:
        raise
      log(f'skipped: {error}')
      chosen.remove(chosen_step)
  return [evaluate_and_write(evaluator, chosen_step)
          for chosen_step in progress(chosen, 'checkpoints', unit='checkpoint')]


def _make_evaluator(workdir, config, devices):
  evaluator = eval_lib.Evaluator(workdir, config, devices)
  log(f'evaluating {workdir} on {evaluator.mesh_description}')
  return evaluator


def from_process_0(steps):
  """Process 0's list of steps, on every process (the list itself where there is one process)."""
  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  chosen = np.array(steps, np.int64) if jax.process_index() == 0 else np.zeros(count, np.int64)  # same shape on all
  return [int(s) for s in multihost_utils.broadcast_one_to_all(chosen)]


def watch_checkpoints(workdir, overrides, devices, poll_seconds, timeout_seconds):
  """Evaluates each new checkpoint until the one at config.train.steps is done; raises if none comes for a timeout.
  It may start before training does: it first waits for tokenizer.json, which perijax.train writes after config.json."""
  if jax.process_count() > 1:
    raise EvaluationError(f'--watch runs as one process (here {jax.process_count()}): it follows a training run as '
                          'it writes; evaluate with several processes by --step or --all')
  started = time.time()
  if not rundir.tokenizer_file(workdir).is_file():
    log(f'waiting for training to start in {workdir}')
  while not rundir.tokenizer_file(workdir).is_file():
    if time.time() - started > timeout_seconds:
      raise EvaluationError(f'--watch: {workdir} has no config.json and tokenizer.json after {timeout_seconds:g} s; '
                            'is training running with this --workdir?')
    time.sleep(poll_seconds)
  evaluator = _make_evaluator(workdir, prepare(workdir, overrides), devices)
  final_step = evaluator.config.train.steps
  results, last_progress, damaged = [], time.time(), set()
  while not _evaluated(workdir, final_step):
    for step in [s for s in evaluator.steps() if not _evaluated(workdir, s) and s not in damaged]:
      try:
        evaluator.check_checkpoint(step)
        results.append(evaluate_and_write(evaluator, step))
      except checkpoint_lib.IncompleteCheckpointError:
        continue  # renamed into place a moment before its checksums: looked at again next time
      except checkpoint_lib.DamagedCheckpointError as error:
        if step == final_step:
          raise
        log(f'skipped: {error}')
        damaged.add(step)
      except checkpoint_lib.CheckpointError:
        if step in evaluator.steps():
          raise
        log(f'checkpoint {step} was deleted (config.checkpoint.keep) before it could be evaluated; skipped')
      last_progress = time.time()
    if _evaluated(workdir, final_step):
      break
    if time.time() - last_progress > timeout_seconds:
      raise EvaluationError(f'--watch: no new checkpoint in {checkpoint_lib.checkpoint_dir(workdir)} for '
                            f'{timeout_seconds:g} s and training has not finished (no checkpoint at step '
                            f'{final_step} = config.train.steps); raise --timeout_seconds to wait longer')
    time.sleep(poll_seconds)
  log(f'training finished: the checkpoint at step {final_step} is evaluated')
  return results
