"""Where training numbers go (process 0 only): WORKDIR/metrics.jsonl, or part files on an object store, which cannot
append; TensorBoard; W&B if config.wandb.enabled (imported only then, its run id kept in the workdir so a resumed
training continues the same W&B run); a console line. README.md, "Metrics", "Object-store workdirs" and
"Weights & Biases", says the rest.
"""

import json
import math
import os
import secrets
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

from perijax import rundir

PART_LINES = 100  # lines per metrics part file on an object store
WINDOW_KEYS = ('loss', 'grad_norm', 'layer_grad_norm')  # per-step values a logged line summarizes over its window


def window_summary(steps):
  """Means of each step's WINDOW_KEYS since the last logged line over the steps where each is finite (a skipped
  step's gradient norm is not), and `grad_norm_max`; NaN where no step was finite."""
  summary = {}
  for key in WINDOW_KEYS:
    values = np.asarray([step[key] for step in steps], np.float64)
    finite = np.isfinite(values)
    count = finite.sum(axis=0)
    summary[key] = np.where(count > 0, np.where(finite, values, 0.0).sum(axis=0) / np.maximum(count, 1),
                            np.nan).tolist()
    if key == 'grad_norm':
      summary['grad_norm_max'] = float(np.max(values[finite])) if count else math.nan
  return summary


def scalars(record):
  """{name: float} of a record's numbers, a per-layer list as `key/layer_000`, ... (TensorBoard's and W&B's names),
  less an `mfu` of NaN: not computed (hardware.mfu_notice), on every line, and TensorBoard warns of each NaN."""
  flat = {}
  for key, value in record.items():
    if key == 'mfu' and math.isnan(value):
      continue
    if isinstance(value, list) and all(item is None or isinstance(item, (int, float)) for item in value):
      flat.update({f'{key}/layer_{layer:03d}': float(item) for layer, item in enumerate(value) if item is not None})
    elif isinstance(value, (int, float, bool)):   # not text, not the massive_* lists of dicts
      flat[key] = float(value)
  return flat


class MetricsWriter:
  """Writes metrics lines to metrics.jsonl (or part files on an object store), TensorBoard and W&B."""

  def __init__(self, workdir, total_steps, config):
    self.enabled = jax.process_index() == 0
    self.total_steps, self.started, self.first_step, self.wandb_run = total_steps, time.time(), None, None
    self.workdir, self.jsonl, self.part, self.part_lines = workdir, None, None, []
    if not self.enabled:
      return
    if rundir.is_local(workdir):
      self.jsonl = rundir.metrics_file(workdir).open('a')
    else:  # parts are numbered after those of earlier starts of the run
      self.part = len(rundir.metrics_files(workdir))
      rundir.metrics_dir(workdir).mkdir(parents=True, exist_ok=True)
    self.tensorboard = SummaryWriter(str(rundir.tensorboard(workdir)))
    if config.wandb.enabled:
      self.wandb_run = start_wandb_run(workdir, config)

  def write(self, step, record):
    if not self.enabled:
      return
    line = json.dumps({'step': step, **record}) + '\n'
    if self.jsonl is not None:
      self.jsonl.write(line)
      self.jsonl.flush()
    else:
      if not self.part_lines or len(self.part_lines) >= PART_LINES:
        self.part, self.part_lines = self.part + 1, []
      self.part_lines.append(line)
      rundir.metrics_part(self.workdir, self.part).write_text(''.join(self.part_lines))
    numbers = scalars(record)
    for name, value in numbers.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()
    if self.wandb_run is not None:
      self.wandb_run.log(numbers, step=step)

  def console(self, step, record):
    """step, loss, tokens/s and the time left at the rate since the first line."""
    if not self.enabled:
      return
    eta = '?'
    if self.first_step is None:
      self.first_step, self.started = step, time.time()
    else:
      left = int((time.time() - self.started) / max(step - self.first_step, 1) * (self.total_steps - step))
      eta = f'{left // 3600}:{left % 3600 // 60:02d}:{left % 60:02d}'
    print(f"step {step:>6}/{self.total_steps}  loss {record.get('loss', math.nan):7.4f}  "
          f"tok/s {record.get('tokens_per_sec', 0):9.0f}  mfu {record.get('mfu', 0):5.1%}  "
          f"scale {record.get('loss_scale', 1):8.0f}  skipped {record.get('skipped_steps', 0)}  ETA {eta}", flush=True)

  def close(self):
    if not self.enabled:
      return
    if self.jsonl is not None:
      self.jsonl.close()
    self.tensorboard.close()
    if self.wandb_run is not None:
      self.wandb_run.finish()


def start_wandb_run(workdir, config):
  """Starts (or, with WORKDIR/wandb_run_id from an earlier start, resumes) the W&B run of this workdir."""
  import wandb  # pylint: disable=g-import-not-at-top  (only runs that log to W&B pay for importing it)
  id_path = rundir.wandb_id_file(workdir)
  if id_path.is_file():
    run_id = id_path.read_text().strip()
  else:
    run_id = secrets.token_hex(6)
    id_path.write_text(run_id + '\n')  # before the run starts: a run killed while starting still resumes the same id
  # W&B keeps its own files on local disk: the workdir if it is local, else W&B's default directory.
  local_dir = str(rundir.root(workdir)) if rundir.is_local(workdir) else None
  return wandb.init(project=config.wandb.project, entity=config.wandb.entity or None, name=rundir.root(workdir).name,
                    id=run_id, resume='allow', mode=os.environ.get('WANDB_MODE') or config.wandb.mode,
                    dir=os.environ.get('WANDB_DIR') or local_dir, config=config.to_dict())
