"""PNG figures of one or many runs (perijax.report --plots): residual variance per layer over training (curves and a
layer x step heatmap), gradient norm per layer, loss, loss scale, massive activations. Every line is labelled; a
placement has one colour in every figure, the experiments' too (PLACEMENT_COLORS), and runs of one placement differ in
line style. Each plot_* function writes one PNG of perijax.runs.RunRecords; matplotlib runs headless (Agg).
"""

import math
import os
from typing import List, Sequence

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
import numpy as np

from perijax import tables  # pylint: disable=g-import-not-at-top

# tab10's colours; grey is left for runs without a placement.
PLACEMENT_COLORS = {'post': '#d62728', 'pre': '#1f77b4', 'peri': '#2ca02c', 'pre_post': '#9467bd',
                    'output': '#ff7f0e', 'mix': '#8c564b', 'none': '#e377c2'}
_OTHER_COLORS = ('#7f7f7f', '#bcbd22', '#17becf', '#000000')
LINESTYLES = ('-', '--', ':', '-.')
MAX_CURVES = 8  # stats steps drawn per panel, so that every curve keeps a readable legend entry
MASSIVE_STYLES = (('residual', '-', 'o'), ('attn_out', '--', 's'), ('mlp_out', ':', '^'))


def placement_color(placement):
  return PLACEMENT_COLORS.get(placement, _OTHER_COLORS[0])


def save_figure(fig, path):
  """Writes a PNG (creating its folder) and frees the figure."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _series(run, key):
  """(steps, values) of a scalar metric over the run, skipping lines that lack it."""
  points = [(line['step'], float(line[key])) for line in run.metrics if line.get(key) is not None]
  return [step for step, _ in points], [value for _, value in points]


def _positive(values):
  """Values for a log axis: non-finite or non-positive ones become gaps (NaN) instead of breaking the scale."""
  array = np.asarray(values, dtype=np.float64)
  return np.where(np.isfinite(array) & (array > 0), array, np.nan)


def _stack(lists):
  """Per-layer lists of different lengths as one [lists, layers] array of `_positive` values, NaN-padded."""
  stacked = np.full((len(lists), max(map(len, lists))), np.nan)
  for i, values in enumerate(lists):
    stacked[i, :len(values)] = _positive(values)
  return stacked


def _layers(values):
  return range(1, len(values) + 1)


def _styles(runs):
  """Per run, its placement's colour and a line style that tells apart runs of the same placement (seeds, lrs)."""
  styles, seen = [], {}
  for run in runs:
    index = seen[run.placement] = seen.get(run.placement, -1) + 1
    color = PLACEMENT_COLORS.get(run.placement, _OTHER_COLORS[index % len(_OTHER_COLORS)])
    styles.append({'color': color, 'linestyle': LINESTYLES[index % len(LINESTYLES)]})
  return styles


def _finish(ax, title, has_data, missing, xlabel='layer', log=True):
  """Title and x axis, then a log y axis (if `log`) and a legend, or a note that `missing` was not recorded."""
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel)
  if xlabel == 'layer':
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if not has_data:
    ax.text(0.5, 0.5, f'no {missing} recorded', ha='center', va='center', transform=ax.transAxes)
    return
  if log:
    ax.set_yscale('log')
  if ax.get_legend_handles_labels()[0]:   # an empty legend only draws a warning
    ax.legend(fontsize=6)


def _spread(items, count):
  """At most `count` items, evenly spaced, first and last included."""
  return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)))]


def _panels(count):
  """A figure with one panel per run (at most 3 a row), unused panels hidden."""
  columns = min(count, 3)
  rows = math.ceil(count / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False, layout='constrained')
  for ax in list(axes.flat)[count:]:
    ax.axis('off')
  return fig, list(axes.flat)[:count]


def plot_residual_variance(runs: Sequence, path: str) -> str:
  """One panel per run: residual variance after each layer, one curve per stats step (at most MAX_CURVES, evenly
  spaced; dark = early), log y."""
  fig, axes = _panels(len(runs))
  for ax, run in zip(axes, runs):
    lines = _spread([line for line in run.metrics if line.get('residual_var')], MAX_CURVES)
    for i, line in enumerate(lines):
      ax.plot(_layers(line['residual_var']), _positive(line['residual_var']), marker='.', label=f'step {line["step"]}',
              color=plt.get_cmap('viridis')(i / max(len(lines) - 1, 1)))
    ax.set_ylabel('residual variance')
    _finish(ax, run.name, bool(lines), 'per-layer stats')
  fig.suptitle('Residual-stream variance per layer over training')
  return save_figure(fig, path)


def plot_layer_grad_norm(runs: Sequence, path: str) -> str:
  """Gradient norm per layer: at each run's last logged step, and its mean over all logged steps."""
  fig, (last_ax, mean_ax) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  for run, style in zip(runs, _styles(runs)):
    lines = [line for line in run.metrics if line.get('layer_grad_norm')]
    if not lines:
      continue
    last = lines[-1]['layer_grad_norm']
    last_ax.plot(_layers(last), _positive(last), marker='o', **style, label=f'{run.name} (step {lines[-1]["step"]})')
    stacked = _stack([line['layer_grad_norm'] for line in lines])
    with np.errstate(all='ignore'):
      mean = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    mean_ax.plot(_layers(mean), mean, marker='o', **style, label=run.name)
  for ax, title in ((last_ax, 'at the last logged step'), (mean_ax, 'mean over logged steps')):
    _finish(ax, f'gradient norm per layer, {title}', bool(last_ax.lines), 'layer_grad_norm')
  return save_figure(fig, path)


def plot_loss(runs: Sequence, path: str) -> str:
  """Training loss per logged step (lines) and evaluation loss per evaluated step (markers)."""
  fig, ax = plt.subplots(figsize=(7, 4.2), layout='constrained')
  for run, style in zip(runs, _styles(runs)):
    ax.plot(*_series(run, 'loss'), **style, label=f'{run.name} train')
    eval_steps = sorted(s for s, e in run.evals.items() if e.get('loss') is not None)
    if eval_steps:
      ax.plot(eval_steps, [run.evals[s]['loss'] for s in eval_steps], 'o', color=style['color'], markersize=5,
              label=f'{run.name} eval')
  ax.set_ylabel('loss (nats/token)')
  _finish(ax, 'Loss', True, '', xlabel='step', log=False)
  return save_figure(fig, path)


def plot_loss_scale(runs: Sequence, path: str) -> str:
  """The float16 dynamic loss scale (log y) and the cumulative count of skipped (non-finite) steps."""
  fig, (scale_ax, skipped_ax) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  for run, style in zip(runs, _styles(runs)):
    steps, scale = _series(run, 'loss_scale')
    scale_ax.plot(steps, _positive(scale), **style, label=run.name)
    skipped_ax.plot(*_series(run, 'skipped_steps'), **style, label=run.name)
  has_scale = any(np.isfinite(line.get_ydata()).any() for line in scale_ax.lines)
  _finish(scale_ax, 'loss scale', has_scale, 'loss_scale (float32 or bfloat16 run?)', xlabel='step')
  _finish(skipped_ax, 'skipped steps (cumulative)', True, '', xlabel='step', log=False)
  return save_figure(fig, path)


def plot_variance_heatmap(runs: Sequence, path: str) -> str:
  """One panel per run: log10 residual variance, layer (rows) by stats step (columns)."""
  fig, axes = _panels(len(runs))
  for ax, run in zip(axes, runs):
    lines = [line for line in run.metrics if line.get('residual_var')]
    _finish(ax, run.name, bool(lines), 'per-layer stats', xlabel='step', log=False)
    if not lines:
      continue
    grid = np.log10(_stack([line['residual_var'] for line in lines])).T
    image = ax.imshow(grid, aspect='auto', origin='lower', cmap='magma', interpolation='nearest',
                      extent=(-0.5, len(lines) - 0.5, 0.5, grid.shape[0] + 0.5))
    ticks = _spread(range(len(lines)), 5)
    ax.set_xticks(ticks, [str(lines[t]['step']) for t in ticks], fontsize=7)
    ax.set_ylabel('layer')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label='log10 residual variance')
  fig.suptitle('Residual-stream variance, layer by step')
  return save_figure(fig, path)


def plot_massive_activations(runs: Sequence, path: str) -> str:
  """At each run's last stats step: the largest |x| per layer (left) and its ratio to the median |x| (right), for the
  residual stream and each sub-layer's output, with Sun et al. 2024's thresholds (the first run's config)."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout='constrained')
  thresholds = None
  for run, style in zip(runs, _styles(runs)):
    lines = [line for line in run.metrics if line.get('massive_residual')]
    if not lines:
      continue
    thresholds = thresholds or tables.massive_thresholds(run)
    for name, linestyle, marker in MASSIVE_STYLES:
      entries = lines[-1].get(f'massive_{name}') or []
      for ax, key in zip(axes, ('abs', 'ratio')):
        ax.plot(_layers(entries), _positive([e[key][0] for e in entries]), color=style['color'], linestyle=linestyle,
                marker=marker, label=f'{run.name} {name} (step {lines[-1]["step"]})')
  for ax, title, index in zip(axes, ('largest |x| per layer', 'largest |x| / median |x|'), (0, 1)):
    if thresholds:
      ax.axhline(thresholds[index], color='k', linewidth=0.8, linestyle='-.',
                 label=f'massive above {thresholds[index]:g}')
    _finish(ax, title, thresholds is not None, 'massive-activation statistics')
  fig.suptitle('Massive activations (Sun et al. 2024)')
  return save_figure(fig, path)


def write_plots(runs: Sequence, out_dir: str) -> List[str]:
  """Writes every plot of `runs` into `out_dir`; returns the paths."""
  if not runs:
    raise ValueError('no runs to plot')
  plots = {'residual_variance': plot_residual_variance, 'layer_grad_norm': plot_layer_grad_norm, 'loss': plot_loss,
           'loss_scale': plot_loss_scale, 'residual_variance_heatmap': plot_variance_heatmap,
           'massive_activations': plot_massive_activations}
  return [plot(runs, os.path.join(out_dir, f'{name}.png')) for name, plot in plots.items()]
