"""Evaluates a run's checkpoints, as a process of its own beside (or after) training:

    python -m perijax.evaluate --workdir=DIR [--step=N | --all | --watch] [--config.eval.tasks=next_line,piqa ...]

Reads DIR/config.json, DIR/tokenizer.json and DIR/checkpoints/<step>/; writes DIR/eval/step_N.json (docs/evaluation.md,
"The result file"), TensorBoard scalars under DIR/eval/tensorboard and (config.eval.lm_eval_results) lm-eval's results
file under DIR/eval/lm_eval/. No flag: the latest checkpoint; --step=N: checkpoint N, again if already done; --all:
every checkpoint without an eval/step_N.json; --watch: as --all, then new ones as they appear, until the one at
config.train.steps is done (it may start before training does). `--config.<eval|data|mesh>.<field>=value` overrides
the stored config; the model and training fields are the checkpoint's own. Several processes (a model larger than one
host): the same command on every host with perijax.train's distributed flags; process 0 writes (--watch: one process).
Every checkpoint is verified against its checksums: --all and --watch skip a damaged one (a `skipped:` line); the
latest or --step=N stops. Bad input prints one `perijax.evaluate: error:` line, exits 1 and writes nothing.
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
  flags.DEFINE_float('timeout_seconds', 3600.0, '--watch: give up (error) after this long without a new checkpoint.')
  cli.define_distributed_flags()  # a model too large for one host's devices: as for perijax.train


def main(argv):
  del argv   # cli.run rejects positional arguments
  logging.set_verbosity(logging.ERROR)  # Orbax and grain are chatty; errors come as one line below
  values = flags.FLAGS
  cli.initialize_distributed()
  evaluate.run(values.workdir, step=values.step, evaluate_all=values.all, watch=values.watch,
               overrides=cli.overrides(), poll_seconds=values.poll_seconds, timeout_seconds=values.timeout_seconds)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
