"""The run directory (WORKDIR) of one training run: the only module that knows its layout.

    config.json              the resolved config (perijax.train)
    tokenizer.json           which tokenizer the run used; tokenizer.model: a copy of its sentencepiece model, if any
    checkpoints/<step>/      Orbax checkpoints (perijax/checkpoint.py)
    checkpoints_damaged/     steps set aside by --resume_from_intact (perijax/checkpoint.py)
    metrics.jsonl            training metrics, one JSON object per line (a local workdir: appended to)
    metrics/part_<n>.jsonl   the same lines on an object store, which cannot append (perijax/metrics.py)
    tensorboard/             training TensorBoard event files
    wandb_run_id             the W&B run id, so a resumed run continues the same W&B run
    eval/step_<N>.json       perijax.evaluate's result for checkpoint N; eval/tensorboard/ its TensorBoard scalars
    eval/lm_eval/            task scores in lm-eval's results format (perijax/tasks/lm_eval_results.py)
    train.log, eval.log      perijax.sweep's logs of the commands it ran for the run

Every path is an `etils.epath.Path`, as Orbax's are, so WORKDIR may be local or an object-store URL
(`gs://bucket/runs/x`; epath reads and writes it through gcsfs or TensorFlow's gfile, whichever is installed).
"""

import re

from etils import epath

SENTENCEPIECE_MODEL = 'tokenizer.model'  # the name tokenizer.json records for the model copy


def is_local(workdir) -> bool:
  """False for a URL (gs://, s3://, ...): an object store, whose files are written whole and never appended to."""
  return '://' not in str(workdir)


def root(workdir) -> epath.Path:
  path = epath.Path(workdir)
  return path.absolute() if is_local(workdir) else path  # Orbax wants absolute paths


def config_file(workdir) -> epath.Path:
  return root(workdir) / 'config.json'


def tokenizer_file(workdir) -> epath.Path:
  return root(workdir) / 'tokenizer.json'


def checkpoints(workdir) -> epath.Path:
  return root(workdir) / 'checkpoints'


def damaged_checkpoints(workdir) -> epath.Path:
  return root(workdir) / 'checkpoints_damaged'


def checkpoint_state(workdir, step) -> epath.Path:
  return checkpoints(workdir) / str(step) / 'state'


def metrics_file(workdir) -> epath.Path:
  return root(workdir) / 'metrics.jsonl'


def metrics_dir(workdir) -> epath.Path:
  return root(workdir) / 'metrics'


def metrics_part(workdir, number) -> epath.Path:
  return metrics_dir(workdir) / f'part_{number:06d}.jsonl'


def metrics_files(workdir) -> list:
  """The files holding the run's metrics lines, in the order they were written (a later line for a step wins)."""
  parts = metrics_dir(workdir)
  found = sorted(parts.glob('part_*.jsonl')) if parts.is_dir() else []
  return ([metrics_file(workdir)] if metrics_file(workdir).exists() else []) + found


def tensorboard(workdir) -> epath.Path:
  return root(workdir) / 'tensorboard'


def wandb_id_file(workdir) -> epath.Path:
  return root(workdir) / 'wandb_run_id'


def eval_dir(workdir) -> epath.Path:
  return root(workdir) / 'eval'


def eval_result(workdir, step) -> epath.Path:
  return eval_dir(workdir) / f'step_{step}.json'


def eval_results(workdir) -> dict:
  """{step: path} of the evaluation results written so far."""
  found = eval_dir(workdir).glob('step_*.json') if eval_dir(workdir).is_dir() else []
  return {int(match.group(1)): path for path in found if (match := re.fullmatch(r'step_(\d+)\.json', path.name))}


def eval_tensorboard(workdir) -> epath.Path:
  return eval_dir(workdir) / 'tensorboard'


def command_log(workdir, command) -> epath.Path:
  """perijax.sweep's log of `command` ('train' or 'eval') for this run."""
  return root(workdir) / f'{command}.log'


def is_run(path) -> bool:
  """A run's workdir has config.json or metrics (a sweep root has neither)."""
  return config_file(path).exists() or bool(metrics_files(path))
