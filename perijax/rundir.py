"""The run directory (WORKDIR) of one training run: the only module that knows its layout.

Every path is an `etils.epath.Path`, as Orbax's are, so WORKDIR may be local or an object-store URL
(`gs://bucket/runs/x`; epath reads and writes it through gcsfs or TensorFlow's gfile, whichever is installed).
"""

import re

from etils import epath

SENTENCEPIECE_MODEL = 'tokenizer.model'  # the copy of a run's sentencepiece model, as tokenizer.json records it


def is_local(workdir) -> bool:
  """False for a URL (gs://, s3://, ...): an object store, whose files are written whole and never appended to."""
  return '://' not in str(workdir)


def root(workdir) -> epath.Path:
  path = epath.Path(workdir)
  return path.absolute() if is_local(workdir) else path  # Orbax wants absolute paths


def _entry(*parts):
  """The function `workdir -> WORKDIR/parts...` of one entry of the layout."""
  def path(workdir) -> epath.Path:
    return root(workdir).joinpath(*parts)
  return path


# The layout: every file and directory of a workdir.
config_file = _entry('config.json')                 # the resolved config (perijax.train)
tokenizer_file = _entry('tokenizer.json')           # which tokenizer the run used
checkpoints = _entry('checkpoints')                 # <step>/: Orbax checkpoints (perijax/checkpoint.py)
damaged_checkpoints = _entry('checkpoints_damaged')   # steps set aside by --resume_from_intact
metrics_file = _entry('metrics.jsonl')              # training metrics, one JSON object per line (local: appended to)
metrics_dir = _entry('metrics')                     # part_<n>.jsonl: the same lines on an object store (metrics.py)
tensorboard = _entry('tensorboard')                 # training TensorBoard event files
wandb_id_file = _entry('wandb_run_id')              # so a resumed run continues the same W&B run
eval_dir = _entry('eval')                           # step_<N>.json: evaluation results; lm_eval/: in lm-eval's format
eval_tensorboard = _entry('eval', 'tensorboard')    # evaluation TensorBoard scalars


def checkpoint_state(workdir, step) -> epath.Path:
  return checkpoints(workdir) / str(step) / 'state'


def metrics_part(workdir, number) -> epath.Path:
  return metrics_dir(workdir) / f'part_{number:06d}.jsonl'


def metrics_files(workdir) -> list:
  """The files holding the run's metrics lines, in the order they were written (a later line for a step wins)."""
  parts = metrics_dir(workdir)
  found = sorted(parts.glob('part_*.jsonl')) if parts.is_dir() else []
  return ([metrics_file(workdir)] if metrics_file(workdir).exists() else []) + found


def eval_result(workdir, step) -> epath.Path:
  return eval_dir(workdir) / f'step_{step}.json'


def eval_results(workdir) -> dict:
  """{step: path} of the evaluation results written so far."""
  found = eval_dir(workdir).glob('step_*.json') if eval_dir(workdir).is_dir() else []
  return {int(match.group(1)): path for path in found if (match := re.fullmatch(r'step_(\d+)\.json', path.name))}


def command_log(workdir, command) -> epath.Path:
  """perijax.sweep's log of `command` ('train' or 'eval') for this run: WORKDIR/train.log, WORKDIR/eval.log."""
  return root(workdir) / f'{command}.log'


def is_run(path) -> bool:
  """A run's workdir has config.json or metrics (a sweep root has neither)."""
  return config_file(path).exists() or bool(metrics_files(path))
