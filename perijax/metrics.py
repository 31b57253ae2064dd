"""Where training numbers go: WORKDIR/metrics.jsonl, TensorBoard event files and a console line. Process 0 only.

metrics.jsonl has one JSON object per line. Keys tools rely on: step, loss, lr, grad_norm, loss_scale, skipped_steps,
spike, spikes, forward_overflows, tokens_per_sec, mfu, layer_grad_norm (a list by layer), and on statistics steps the
per-layer lists of `perijax.stats.layer_summary` (residual_var, residual_rms, max_abs, fp16_headroom, fp16_overflow,
attn_out_var, mlp_out_var). Non-finite numbers are written as NaN/Infinity (Python's json).
"""

import json
import math
import os
import time

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Appends to metrics.jsonl (a resumed run continues the file) and writes the same numbers to TensorBoard."""

  def __init__(self, workdir, total_steps, enabled=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self.started = time.time()
    self.first_step = None
    if self.enabled:
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self.tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, record):
    if not self.enabled:
      return
    record = {'step': step, **record}
    self.jsonl.write(json.dumps(record) + '\n')
    self.jsonl.flush()
    for key, value in record.items():
      if key == 'step':
        continue
      if isinstance(value, list):
        for layer, item in enumerate(value):
          self.tensorboard.add_scalar(f'{key}/layer_{layer:03d}', item, step)
      elif isinstance(value, (int, float, bool)):
        self.tensorboard.add_scalar(key, float(value), step)
    self.tensorboard.flush()

  def console(self, step, record):
    """step, loss, tokens/s and the time left at the recent rate."""
    if not self.enabled:
      return
    if self.first_step is None:
      self.first_step, self.started = step, time.time()
      eta = '?'
    else:
      rate = (time.time() - self.started) / max(step - self.first_step, 1)
      eta = _duration(rate * (self.total_steps - step))
    print(f"step {step:>6}/{self.total_steps}  loss {record.get('loss', math.nan):7.4f}  "
          f"tok/s {record.get('tokens_per_sec', 0):9.0f}  mfu {record.get('mfu', 0):5.1%}  "
          f"scale {record.get('loss_scale', 1):8.0f}  skipped {record.get('skipped_steps', 0)}  ETA {eta}", flush=True)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tensorboard.close()


def _duration(seconds):
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
