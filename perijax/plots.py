"""PNG plots of one or many runs: variance per layer over training (curves and a layer x step heatmap), gradient norm
per layer, loss, loss scale, massive activations. Every line is labelled; a placement has the same colour in every
figure (PLACEMENT_COLORS, which the experiments' figures use too), runs of one placement differ in line style.
Each function takes perijax.runs.RunRecords and writes one PNG; matplotlib runs headless (Agg), as on a pod or in CI.
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


def _series(run, key):
  """(steps, values) of a scalar metric over the run, skipping lines that lack it."""
  points = [(line['step'], line[key]) for line in run.metrics if key in line and line[key] is not None]
  return [p[0] for p in points], [float(p[1]) for p in points]


def _positive(values):
  """Values for a log axis: non-finite or non-positive ones become gaps (NaN) instead of breaking the scale."""
  array = np.asarray(values, dtype=np.float64)
  return np.where(np.isfinite(array) & (array > 0), array, np.nan)


# One colour per placement in every figure, experiments' too (tab10's colours; grey is left for runs without one).
PLACEMENT_COLORS = {'post': '#d62728', 'pre': '#1f77b4', 'peri': '#2ca02c', 'pre_post': '#9467bd',
                    'output': '#ff7f0e', 'mix': '#8c564b', 'none': '#e377c2'}
_OTHER_COLORS = ('#7f7f7f', '#bcbd22', '#17becf', '#000000')
LINESTYLES = ('-', '--', ':', '-.')


def placement_color(placement):
  """The colour of `placement` in every perijax figure."""
  return PLACEMENT_COLORS.get(placement, _OTHER_COLORS[0])


def _colors(runs):
  """Per run, its placement's colour and a line style that tells apart runs of the same placement (seeds, lrs)."""
  styles, seen = [], {}
  for run in runs:
    index = seen[run.placement] = seen.get(run.placement, -1) + 1
    color = PLACEMENT_COLORS.get(run.placement, _OTHER_COLORS[index % len(_OTHER_COLORS)])
    styles.append({'color': color, 'linestyle': LINESTYLES[index % len(LINESTYLES)]})
  return styles


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


MAX_CURVES = 8  # stats steps drawn per panel, so that every curve keeps a readable legend entry


def _spread(items, count):
  """At most `count` items, evenly spaced, first and last included."""
  if len(items) <= count:
    return items
  return [items[i] for i in sorted({round(j * (len(items) - 1) / (count - 1)) for j in range(count)})]


def _panels(count):
  """A figure with one panel per run (at most 3 a row), unused panels hidden."""
  columns = min(count, 3)
  rows = math.ceil(count / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False, layout='constrained')
  for ax in list(axes.flat)[count:]:
    ax.axis('off')
  return fig, list(axes.flat)[:count]


def plot_residual_variance(runs: Sequence, path: str) -> str:
  """One panel per run: residual variance after each layer, one labelled curve per stats step (at most MAX_CURVES,
  evenly spaced; dark = early), log y."""
  fig, axes = _panels(len(runs))
  for ax, run in zip(axes, runs):
    stats = _spread([line for line in run.metrics if line.get('residual_var')], MAX_CURVES)
    cmap = plt.get_cmap('viridis')
    for i, line in enumerate(stats):
      variance = line['residual_var']
      ax.plot(range(1, len(variance) + 1), _positive(variance), marker='.', color=cmap(i / max(len(stats) - 1, 1)),
              label=f'step {line["step"]}')
    if stats:
      ax.set_yscale('log')
      ax.legend(fontsize=7)
    else:
      _no_data(ax, 'per-layer stats')
    ax.set_title(run.name, fontsize=8)
    _layer_axis(ax)
    ax.set_ylabel('residual variance')
  fig.suptitle('Residual-stream variance per layer over training')
  return save_figure(fig, path)


def plot_layer_grad_norm(runs: Sequence, path: str) -> str:
  """Gradient norm per layer: at each run's last logged step, and its mean over all logged steps."""
  fig, (last_ax, mean_ax) = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  any_data = False
  for run, style in zip(runs, _colors(runs)):
    lines = [line for line in run.metrics if line.get('layer_grad_norm')]
    if not lines:
      continue
    any_data = True
    last = lines[-1]['layer_grad_norm']
    last_ax.plot(range(1, len(last) + 1), _positive(last), marker='o', **style,
                 label=f'{run.name} (step {lines[-1]["step"]})')
    stacked = np.full((len(lines), max(len(line['layer_grad_norm']) for line in lines)), np.nan)
    for i, line in enumerate(lines):
      stacked[i, :len(line['layer_grad_norm'])] = _positive(line['layer_grad_norm'])
    with np.errstate(all='ignore'):
      mean = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else stacked[0]
    mean_ax.plot(range(1, stacked.shape[1] + 1), mean, marker='o', **style, label=run.name)
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
  for run, style in zip(runs, _colors(runs)):
    steps, loss = _series(run, 'loss')
    ax.plot(steps, loss, **style, label=f'{run.name} train')
    eval_steps = sorted(s for s, e in run.evals.items() if e.get('loss') is not None)
    if eval_steps:
      ax.plot(eval_steps, [run.evals[s]['loss'] for s in eval_steps], 'o', color=style['color'], markersize=5,
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
  for run, style in zip(runs, _colors(runs)):
    steps, scale = _series(run, 'loss_scale')
    scale = _positive(scale)
    any_scale |= bool(np.isfinite(scale).any())
    scale_ax.plot(steps, scale, **style, label=run.name)
    steps, skipped = _series(run, 'skipped_steps')
    skipped_ax.plot(steps, skipped, **style, label=run.name)
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


def plot_variance_heatmap(runs: Sequence, path: str) -> str:
  """One panel per run: log10 residual variance, layer (rows) by stats step (columns)."""
  fig, axes = _panels(len(runs))
  for ax, run in zip(axes, runs):
    stats = [line for line in run.metrics if line.get('residual_var')]
    ax.set_title(run.name, fontsize=8)
    if not stats:
      _no_data(ax, 'per-layer stats')
      continue
    grid = np.full((max(len(line['residual_var']) for line in stats), len(stats)), np.nan)
    for column, line in enumerate(stats):
      grid[:len(line['residual_var']), column] = np.log10(_positive(line['residual_var']))
    steps = [line['step'] for line in stats]
    image = ax.imshow(grid, aspect='auto', origin='lower', cmap='magma', interpolation='nearest',
                      extent=(-0.5, len(steps) - 0.5, 0.5, grid.shape[0] + 0.5))
    ticks = sorted({round(j * (len(steps) - 1) / 4) for j in range(5)}) if len(steps) > 1 else [0]
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=7)
    ax.set_xlabel('step')
    ax.set_ylabel('layer')
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label='log10 residual variance')
  fig.suptitle('Residual-stream variance, layer by step')
  return save_figure(fig, path)


MASSIVE_STYLES = (('residual', '-', 'o'), ('attn_out', '--', 's'), ('mlp_out', ':', '^'))


def plot_massive_activations(runs: Sequence, path: str) -> str:
  """At each run's last stats step: the largest |x| per layer (left) and its ratio to the median |x| (right), for the
  residual stream and each sub-layer's output, with Sun et al. 2024's thresholds (the first run's config)."""
  fig, (abs_ax, ratio_ax) = plt.subplots(1, 2, figsize=(12, 4.4), layout='constrained')
  thresholds = None
  for run, style in zip(runs, _colors(runs)):
    lines = [line for line in run.metrics if line.get('massive_residual')]
    if not lines:
      continue
    thresholds = thresholds or tables.massive_thresholds(run)
    for name, linestyle, marker in MASSIVE_STYLES:
      entries = lines[-1].get(f'massive_{name}') or []
      layers = range(1, len(entries) + 1)
      for ax, key in ((abs_ax, 'abs'), (ratio_ax, 'ratio')):
        ax.plot(layers, _positive([e[key][0] for e in entries]), color=style['color'], linestyle=linestyle,
                marker=marker, label=f'{run.name} {name} (step {lines[-1]["step"]})')
  for ax, title, index in ((abs_ax, 'largest |x| per layer', 0), (ratio_ax, 'largest |x| / median |x|', 1)):
    ax.set_title(title, fontsize=9)
    _layer_axis(ax)
    if thresholds is None:
      _no_data(ax, 'massive-activation statistics')
      continue
    ax.axhline(thresholds[index], color='k', linewidth=0.8, linestyle='-.',
               label=f'massive above {thresholds[index]:g}')
    ax.set_yscale('log')
    _legend(ax)
  fig.suptitle('Massive activations (Sun et al. 2024)')
  return save_figure(fig, path)


def write_plots(runs: Sequence, out_dir: str) -> List[str]:
  """Writes every plot of `runs` (overlaid where that reads well) into `out_dir`; returns the paths."""
  if not runs:
    raise ValueError('no runs to plot')
  plots = {'residual_variance': plot_residual_variance, 'layer_grad_norm': plot_layer_grad_norm, 'loss': plot_loss,
           'loss_scale': plot_loss_scale, 'residual_variance_heatmap': plot_variance_heatmap,
           'massive_activations': plot_massive_activations}
  return [plot(runs, os.path.join(out_dir, f'{name}.png')) for name, plot in plots.items()]
