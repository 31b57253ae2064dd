"""Evaluates a run's checkpoints, as a process of its own beside (or after) training:

    python -m perijax.evaluate --workdir=DIR [--step=N | --all | --watch] [--config.eval.tasks=next_line,piqa ...]

Reads DIR/config.json, DIR/tokenizer.json and DIR/checkpoints/<step>/, and writes DIR/eval/step_N.json (step, loss,
perplexity, bits_per_byte, tokens, layers, norm_scales, tasks, ...: docs/evaluation.md, "The result file"), TensorBoard
scalars under DIR/eval/tensorboard and (config.eval.lm_eval_results) the task scores in lm-evaluation-harness's format,
DIR/eval/lm_eval/<run>__step_N/results_<date>.json (perijax/tasks/lm_eval_results.py).
  (no flag)  the latest checkpoint;
  --step=N   checkpoint N (evaluated again if already done);
  --all      every checkpoint without an eval/step_N.json yet;
  --watch    like --all, then waits for new checkpoints (every --poll_seconds) and stops once the checkpoint at
             config.train.steps is evaluated (training finished); an error if none appears for --timeout_seconds.
             It may start before training does: it waits (as long) for the workdir's tokenizer.json.
`--config.<eval|data|mesh>.<field>=value` overrides those fields of the stored config (where the data is, which
tasks, how many batches, the mesh); the model and training fields are the checkpoint's own.
Several processes (a model larger than one host's devices): the same command on every host, plus
--coordinator_address/--num_processes/--process_id as for perijax.train (found automatically on TPU pods and SLURM);
process 0 writes the results. --watch runs as one process.
Every checkpoint is verified against the checksums written when it was saved (perijax/checkpoint.py): --all and --watch
skip a damaged one with a `skipped:` line and go on; the latest or --step=N stops with an error.
Bad input (missing workdir, no or unknown checkpoint, a damaged checkpoint, a config that does not match the stored
parameters, an unknown task or field) prints one `perijax.evaluate: error:` line on stderr and exits with status 1,
writing nothing.

The work is the package's: `perijax.evaluate.run` chooses the checkpoints, `perijax/evaluate/eval_lib.py` evaluates one.
"""

from absl import flags, logging

from perijax import cli
from perijax import evaluate


def define_flags():
  cli.define_workdir_flag('Training workdir to evaluate (config.json, checkpoints/).')
  cli.define_config_flags(overrides_only=True)  # --config.<eval|data|mesh>.<field>=value over the stored config
  flags.DEFINE_integer('step', None, 'Evaluate this checkpoint step.')
  flags.DEFINE_bool('all', False, 'Evaluate every checkpoint not yet evaluated.')
  flags.DEFINE_bool('watch', False, 'Evaluate checkpoints as they appear until training has finished.')
  flags.DEFINE_float('poll_seconds', 60.0, '--watch: seconds between looks for new checkpoints.')
  flags.DEFINE_float('timeout_seconds', 3600.0, '--watch: give up (error) when no new checkpoint has appeared for '
                     'this long.')
  cli.define_distributed_flags()  # a model too large for one host's devices: as for perijax.train


def main(argv):
  if len(argv) > 1:
    raise cli.ArgumentError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form --name=value')
  logging.set_verbosity(logging.ERROR)  # Orbax and grain are chatty; errors come as one line below
  values = flags.FLAGS
  cli.initialize_distributed()
  evaluate.run(values.workdir, step=values.step, evaluate_all=values.all, watch=values.watch,
               overrides=cli.overrides(), poll_seconds=values.poll_seconds, timeout_seconds=values.timeout_seconds)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
