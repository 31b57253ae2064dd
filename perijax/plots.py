"""PNG plots of one or many runs: variance per layer over training, gradient norm per layer, loss, loss scale.

Each function takes runs that have `.name`, `.metrics` (the metrics.jsonl lines, sorted by step) and `.evals`
({step: eval json}), and writes one PNG. Matplotlib runs headless (Agg): no display is needed on a pod or in CI.
"""

import math
import os
from typing import List, Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
import numpy as np


def _series(run, key):
  """(steps, values) of a scalar metric over the run, skipping lines that lack it."""
  points = [(line['step'], line[key]) for line in run.metrics if key in line and line[key] is not None]
  return [p[0] for p in points], [float(p[1]) for p in points]


def _positive(values):
  """Values for a log axis: non-finite or non-positive ones become gaps (NaN) instead of breaking the scale."""
  array = np.asarray(values, dtype=np.float64)
  return np.where(np.isfinite(array) & (array > 0), array, np.nan)


def _colors(n):
  cmap = plt.get_cmap('tab10' if n <= 10 else 'tab20')
  return [cmap(i % cmap.N) for i in range(n)]


def save_figure(fig, path):
  """Writes a PNG (creating its folder) and frees the figure."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _legend(ax):
  if ax.get_legend_handles_labels()[0]:   # an empty legend only draws a warning
    ax.legend(fontsize=6)


def _layer_axis(ax):
  ax.set_xlabel('layer')
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _no_data(ax, what):
  ax.text(0.5, 0.5, f'no {what} recorded', ha='center', va='center', transform=ax.transAxes)


def plot_residual_variance(runs: Sequence, path: str) -> str:
  """One panel per run: residual variance after each layer, one curve per stats step (dark = early), log y."""
  columns = min(len(runs), 3)
  rows = math.ceil(len(runs) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False,
                           layout='constrained')
  for ax, run in zip(axes.flat, runs):
    stats = [line for line in run.metrics if line.get('residual_var')]
    cmap = plt.get_cmap('viridis')
    for i, line in enumerate(stats):
      variance = line['residual_var']
      label = f'step {line["step"]}' if i in (0, len(stats) - 1) else None
      ax.plot(range(1, len(variance) + 1), _positive(variance), marker='.', color=cmap(i / max(len(stats) - 1, 1)),
              label=label)
    if stats:
      ax.set_yscale('log')
      ax.legend(fontsize=7)
    else:
      _no_data(ax, 'per-layer stats')
    ax.set_title(run.name, fontsize=8)
    _layer_axis(ax)
    ax.set_ylabel('residual variance')
  for ax in list(axes.flat)[len(runs):]:
    ax.axis('off')
  fig.suptitle('Residual-stream variance per layer over training')
  return save_figure(fig, path)


def plot_layer_grad_norm(runs: Sequence, path: str) -> str:
  """Gradient norm per layer: at each run's last logged step, and its mean over all logged steps."""
  fig, (last_ax, mean_ax) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  any_data = False
  for run, color in zip(runs, _colors(len(runs))):
    lines = [line for line in run.metrics if line.get('layer_grad_norm')]
    if not lines:
      continue
    any_data = True
    last = np.asarray(lines[-1]['layer_grad_norm'], dtype=np.float64)
    last_ax.plot(range(1, last.size + 1), _positive(last), marker='o', color=color,
                 label=f'{run.name} (step {lines[-1]["step"]})')
    width = max(len(line['layer_grad_norm']) for line in lines)
    stacked = np.full((len(lines), width), np.nan)
    for i, line in enumerate(lines):
      stacked[i, :len(line['layer_grad_norm'])] = _positive(line['layer_grad_norm'])
    with np.errstate(all='ignore'):
      mean = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    mean_ax.plot(range(1, width + 1), mean, marker='o', color=color, label=run.name)
  for ax, title in ((last_ax, 'at the last logged step'), (mean_ax, 'mean over logged steps')):
    ax.set_title(f'gradient norm per layer, {title}', fontsize=9)
    _layer_axis(ax)
    if any_data:
      ax.set_yscale('log')
      _legend(ax)
    else:
      _no_data(ax, 'layer_grad_norm')
  return save_figure(fig, path)


def plot_loss(runs: Sequence, path: str) -> str:
  """Training loss per logged step (lines) and evaluation loss per evaluated step (markers)."""
  fig, ax = plt.subplots(figsize=(7, 4.2), layout='constrained')
  for run, color in zip(runs, _colors(len(runs))):
    steps, loss = _series(run, 'loss')
    ax.plot(steps, loss, color=color, label=f'{run.name} train')
    eval_steps = sorted(s for s, e in run.evals.items() if e.get('loss') is not None)
    if eval_steps:
      ax.plot(eval_steps, [run.evals[s]['loss'] for s in eval_steps], 'o--', color=color, markersize=5,
              label=f'{run.name} eval')
  ax.set_xlabel('step')
  ax.set_ylabel('loss (nats/token)')
  ax.set_title('Loss')
  _legend(ax)
  return save_figure(fig, path)


def plot_loss_scale(runs: Sequence, path: str) -> str:
  """The float16 dynamic loss scale (log y) and the cumulative count of skipped (non-finite) steps."""
  fig, (scale_ax, skipped_ax) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  any_scale = False
  for run, color in zip(runs, _colors(len(runs))):
    steps, scale = _series(run, 'loss_scale')
    scale = _positive(scale)
    any_scale |= bool(np.isfinite(scale).any())
    scale_ax.plot(steps, scale, color=color, label=run.name)
    steps, skipped = _series(run, 'skipped_steps')
    skipped_ax.plot(steps, skipped, color=color, label=run.name)
  if any_scale:
    scale_ax.set_yscale('log')
  else:
    _no_data(scale_ax, 'loss_scale (float32 or bfloat16 run?)')
  scale_ax.set_title('loss scale', fontsize=9)
  skipped_ax.set_title('skipped steps (cumulative)', fontsize=9)
  for ax in (scale_ax, skipped_ax):
    ax.set_xlabel('step')
    _legend(ax)
  return save_figure(fig, path)


def write_plots(runs: Sequence, out_dir: str) -> List[str]:
  """Writes every plot of `runs` (overlaid where that reads well) into `out_dir`; returns the paths."""
  if not runs:
    raise ValueError('no runs to plot')
  return [
      plot_residual_variance(runs, os.path.join(out_dir, 'residual_variance.png')),
      plot_layer_grad_norm(runs, os.path.join(out_dir, 'layer_grad_norm.png')),
      plot_loss(runs, os.path.join(out_dir, 'loss.png')),
      plot_loss_scale(runs, os.path.join(out_dir, 'loss_scale.png')),
  ]
