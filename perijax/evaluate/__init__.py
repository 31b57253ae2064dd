"""Evaluates a run's checkpoints, as a process of its own beside (or after) training (`eval_lib.py` does the work;
`__main__.py` runs `main`):

    python -m perijax.evaluate --workdir=DIR [--step=N | --all | --watch] [--config.eval.tasks=next_line,piqa ...]

Reads DIR/config.json, DIR/tokenizer.json and DIR/checkpoints/<step>/, and writes DIR/eval/step_N.json with the keys
step, loss, perplexity, bits_per_byte, tokens, layers, norm_scales, tasks (plus split, bytes_per_token, stats_batches,
mesh, eval_seconds), TensorBoard scalars under DIR/eval/tensorboard and (config.eval.lm_eval_results) the task scores in
lm-evaluation-harness's format, DIR/eval/lm_eval/<run>__step_N/results_<date>.json (perijax/tasks/lm_eval_results.py).
  (no flag)  the latest checkpoint;
  --step=N   checkpoint N (evaluated again if already done);
  --all      every checkpoint without an eval/step_N.json yet;
  --watch    like --all, then waits for new checkpoints (every --poll_seconds) and stops once the checkpoint at
             config.train.steps is evaluated (training finished); an error if none appears for --timeout_seconds.
             It may start before training does: it waits (as long) for the workdir's tokenizer.json.
Several processes (a model larger than one host's devices): the same command on every host, plus
--coordinator_address/--num_processes/--process_id as for perijax.train (found automatically on TPU pods and SLURM);
process 0 writes the results. --watch runs as one process.

`--config.<eval|data|mesh>.<field>=value` overrides those fields of the stored config (where the data is, which
tasks, how many batches, the mesh); the model and training fields are the checkpoint's own. Numbers:
  loss           mean negative log-likelihood per target token over config.data.eval_split (config.data.
                 eval_max_batches batches of config.eval.batch_size x config.train.seq_len; 0 = the whole split);
  perplexity     exp(loss);  bits_per_byte: loss / ln 2 / (UTF-8 bytes per target token of the split);
  tokens         target tokens evaluated (the sum of the batches' weights);
  layers         per-layer lists of perijax.stats.layer_summary over ALL evaluated batches (variances averaged over
                 batches, max |x| the maximum, float16 overflows summed; padding positions of a packed row included,
                 as in training's statistics);
  norm_scales    the norms' γ: perijax.stats.scale_summary (in_norm_scale_mean, ... by layer; final_norm_scale_*);
  tasks          {name: {acc, acc_norm, n}}, lm-evaluation-harness scoring (perijax/tasks).
Every checkpoint is verified against the checksums written when it was saved (perijax/checkpoint.py): --all and --watch
skip a damaged one with a `skipped:` line and go on; the latest or --step=N stops with an error.
Bad input (missing workdir, no or unknown checkpoint, a damaged checkpoint, a config that does not match the stored
parameters, an unknown task or field) prints one `perijax.evaluate: error:` line on stderr and exits with status 1,
writing nothing.
"""

import time

from absl import flags, logging
import jax
import numpy as np

from perijax import checkpoint as checkpoint_lib
from perijax import cli
from perijax.evaluate import eval_lib
from perijax import progress as progress_lib
from perijax import rundir
from perijax import tasks as tasks_lib
from perijax.errors import NotFoundError



def define_flags():
  """Only when run as a program: perijax.train defines --workdir too, and tests import both."""
  cli.define_workdir_flag('Training workdir to evaluate (config.json, checkpoints/).')
  cli.define_config_flags(overrides_only=True)  # --config.<eval|data|mesh>.<field>=value over the stored config
  flags.DEFINE_integer('step', None, 'Evaluate this checkpoint step.')
  flags.DEFINE_bool('all', False, 'Evaluate every checkpoint not yet evaluated.')
  flags.DEFINE_bool('watch', False, 'Evaluate checkpoints as they appear until training has finished.')
  flags.DEFINE_float('poll_seconds', 60.0, '--watch: seconds between looks for new checkpoints.')
  flags.DEFINE_float('timeout_seconds', 3600.0, '--watch: give up (error) when no new checkpoint has appeared for '
                     'this long.')
  cli.define_distributed_flags()  # a model too large for one host's devices: as for perijax.train


class EvaluationError(cli.UserError, ValueError):
  """Bad input to the evaluation (the message says what is wrong and what is allowed)."""


def log(message):
  progress_lib.write(message)  # below any progress bar, not through it


def _evaluated(workdir, step):
  return rundir.eval_result(workdir, step).is_file()


def list_checkpoints(workdir):
  """The finished checkpoint steps of WORKDIR (Orbax lists only completely written ones)."""
  if not rundir.checkpoints(workdir).is_dir():
    return []
  return list(checkpoint_lib.make_manager(workdir, read_only=True).all_steps())


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
  if not steps:
    raise EvaluationError(f'no checkpoint in {checkpoint_lib.checkpoint_dir(workdir)} (training writes one every '
                          'config.checkpoint.every steps and at the end)')
  if step is not None:
    if step not in steps:
      raise EvaluationError(f'no checkpoint at step {step} in {checkpoint_lib.checkpoint_dir(workdir)}; the '
                            f'checkpoints there are at steps {", ".join(map(str, steps))}')
    return [step]
  if evaluate_all:
    return [s for s in steps if not _evaluated(workdir, s)]
  return [max(steps)]


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
  if watch and jax.process_count() > 1:
    raise EvaluationError(f'--watch runs as one process (here {jax.process_count()}): it follows a training run as it '
                          'writes; evaluate with several processes by --step or --all')
  if watch:
    wait_for_run(workdir, poll_seconds, timeout_seconds)
  config = prepare(workdir, overrides)
  steps = list_checkpoints(workdir)
  if not watch:
    # Every process checks the request; all then evaluate process 0's choice, whatever each saw on disk.
    chosen = from_process_0(choose_steps(workdir, steps, step, evaluate_all))
    if not chosen:
      log(f'every checkpoint in {checkpoint_lib.checkpoint_dir(workdir)} is already evaluated '
          f'(steps {", ".join(map(str, steps))}); nothing to do')
      return []
  evaluator = eval_lib.Evaluator(workdir, config, devices)
  log(f'evaluating {workdir} on {evaluator.mesh_description}')
  if not watch:
    for chosen_step in list(chosen):  # every chosen checkpoint is checked before the first result is written
      try:
        evaluator.check_checkpoint(chosen_step)
      except checkpoint_lib.DamagedCheckpointError as error:
        if not evaluate_all:
          raise
        log(f'skipped: {error}')
        chosen.remove(chosen_step)
    return [evaluate_and_write(evaluator, chosen_step)
            for chosen_step in progress_lib.progress(chosen, 'checkpoints', unit='checkpoint')]
  return watch_checkpoints(evaluator, config.train.steps, poll_seconds, timeout_seconds)


def from_process_0(steps):
  """Process 0's list of steps, on every process (the list itself where there is one process)."""
  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  chosen = np.array(steps, np.int64) if jax.process_index() == 0 else np.zeros(count, np.int64)  # same shape on all
  return [int(s) for s in multihost_utils.broadcast_one_to_all(chosen)]


def wait_for_run(workdir, poll_seconds, timeout_seconds):
  """--watch may start before training does: waits for the files perijax.train writes first (tokenizer.json last)."""
  started, said = time.time(), False
  while not rundir.tokenizer_file(workdir).is_file():
    if time.time() - started > timeout_seconds:
      raise EvaluationError(f'--watch: {workdir} has no config.json and tokenizer.json after {timeout_seconds:g} s; '
                            'is training running with this --workdir?')
    if not said:
      log(f'waiting for training to start in {workdir}')
      said = True
    time.sleep(poll_seconds)


def watch_checkpoints(evaluator, final_step, poll_seconds, timeout_seconds):
  """Evaluates each new checkpoint until the one at `final_step` is done; raises if none comes for a timeout."""
  results, last_progress, damaged = [], time.time(), set()
  while not _evaluated(evaluator.workdir, final_step):
    pending = [s for s in evaluator.steps(reload=True) if not _evaluated(evaluator.workdir, s) and s not in damaged]
    for step in pending:
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
        if step in evaluator.steps(reload=True):
          raise
        log(f'checkpoint {step} was deleted (config.checkpoint.keep) before it could be evaluated; skipped')
      last_progress = time.time()
    if _evaluated(evaluator.workdir, final_step):
      break
    if time.time() - last_progress > timeout_seconds:
      raise EvaluationError(f'--watch: no new checkpoint in {checkpoint_lib.checkpoint_dir(evaluator.workdir)} for '
                            f'{timeout_seconds:g} s and training has not finished (no checkpoint at step '
                            f'{final_step} = config.train.steps); raise --timeout_seconds to wait longer')
    time.sleep(poll_seconds)
  log(f'training finished: the checkpoint at step {final_step} is evaluated')
  return results


def main(argv):
  if len(argv) > 1:
    raise cli.ArgumentError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form --name=value')
  logging.set_verbosity(logging.ERROR)  # Orbax and grain are chatty; errors come as one line below
  values = flags.FLAGS
  cli.initialize_distributed()
  run(values.workdir, step=values.step, evaluate_all=values.all, watch=values.watch, overrides=cli.overrides(),
      poll_seconds=values.poll_seconds, timeout_seconds=values.timeout_seconds)

