r"""Claim 1 of docs/paper.md, the variance law: Peri-LN's residual variance grows linearly with depth and ignores the
scale of F's weights; Pre-LN's follows F's weights and can grow by orders of magnitude during training.

    python -m experiments.variance_law                               # small scale (configs/tiny.py + SMALL), ~30 min
    python -m experiments.variance_law --config=configs/paper_400m.py --print   # paper scale, for a scheduler

Three measurements:
  1. At initialization, the direct test: every sub-layer's output projection (attention `out`, MLP `down`) multiplied
     by s in --scales; the mean residual-variance increment per sub-layer relative to s = 1. Expected: s² for Pre-LN,
     1 for Peri-LN. The check is on the exponent p of increment ∝ s^p between the two largest scales (|p - 2| < 0.2
     for Pre-LN, |p| < 0.05 for Peri-LN): Pre-LN's increment s²·Var(F) + 2s·Cov(x, F) is exactly s² only once the
     cross term is negligible.
  2. At initialization, the residual variance after each layer and its growth-law fit (perijax/growth.py).
  3. During training (float32, --placements × --seeds runs), the per-layer residual variance at every statistics step:
     the growth-law fit (perijax/growth.py: linear, power, exponential by AIC, else inconclusive) per run and across
     seeds at init and at each step, how many times each layer's variance grew since init (mean ± std over seeds,
     Pre against Peri with whether the difference exceeds the seed spread), and a layer × step heatmap. Per-layer
     lists the runs record beyond the residual variance (the increment decomposition Var(Δ), Cov(x, Δ); norm gains
     γ; ...) are kept over training, and massive-activation tables at the last statistics step, when present.
Small scale: 16 layers of width 64, 1,000 steps of 8 × 64 tokens, 3 seeds per placement: 16 layers to see a law over
depth, 1,000 steps for Pre-LN's variance to grow in training; ~2 minutes a run on two cores (~0.1 CPU-second a step).
Writes results/variance_law.json and results/variance_law.png.
"""

import math
import os
import time

from absl import flags
import numpy as np

from experiments import common
from perijax import cli
from perijax import growth
from perijax import plots
from perijax import report as report_lib
from perijax import tables

NAME = 'variance_law'
SMALL = {'model.num_layers': 16, 'model.d_model': 64, 'model.num_heads': 4, 'train.steps': 1000,
         'train.batch_size': 8, 'train.seq_len': 64, 'train.log_every': 20, 'train.stats_every': 100,
         'checkpoint.every': 0}
PAPER = {'train.steps': 10_000, 'train.stats_every': 500}   # the 400M shape; the law is read well before 30B tokens
# Per-layer lists every run has; any other list on a statistics line is an extra reading kept over training.
BASE_KEYS = ('residual_var', 'residual_rms', 'max_abs', 'fp16_headroom', 'fp16_overflow', 'layer_grad_norm')
FLAGS = flags.FLAGS


def scale_test(setup, placements, scales, batch_size, seed=0):
  """Mean variance increment per sub-layer at each output scale, and its ratio to the s = 1 increment."""
  rows = []
  for placement in placements:
    config = setup.resolved({'model.norm.placement': placement})
    summaries = common.init_layer_stats(config, seed, batch_size, scales)
    # Var after sub-layer k+1 minus Var after k, averaged over the sub-layers.
    increments = [float(np.mean(np.diff(summary['sublayer_var']))) for summary in summaries]
    base = increments[list(scales).index(1.0)] if 1.0 in scales else increments[0]
    ratios = [i / base for i in increments]
    # The exponent p in increment ∝ s^p between the two largest scales: 2 for Pre-LN, 0 for Peri-LN. (At s near 1
    # Pre-LN's increment s²·Var(F) + 2s·Cov(x, F) still feels the cross term, tiny embeddings being of F's size.)
    exponent = (float(np.log(increments[-1] / increments[-2]) / np.log(scales[-1] / scales[-2]))
                if len(scales) > 1 else float('nan'))
    rows.append({'placement': placement, 'scales': list(scales), 'mean_increment': increments,
                 'ratio_to_s1': ratios, 'expected_pre_ln': [s ** 2 for s in scales], 'exponent': exponent})
  return rows


def init_profiles(setup, placements, batch_size, seed=0):
  profiles = []
  for placement in placements:
    summary, = common.init_layer_stats(setup.resolved({'model.norm.placement': placement}), seed, batch_size)
    profiles.append({'placement': placement, 'residual_var': summary['residual_var'],
                     'fit': growth.fit_growth(summary['residual_var']).to_dict()})
  return profiles


def training_profiles(setup, runs, records, batch_size):
  """Per run: the per-layer variance at init (its own seed's parameters) and at every statistics step."""
  rows = []
  for run, record in zip(runs, records):
    lines = [line for line in record.metrics if line.get('residual_var')]
    if not lines:
      continue
    at_init, = common.init_layer_stats(setup.resolved(run.overrides), run.overrides['train.seed'], batch_size)
    first, last = np.asarray(at_init['residual_var']), np.asarray(lines[-1]['residual_var'])
    with np.errstate(all='ignore'):
      growth_over_training = last / first
    lines = [{'step': 0, 'residual_var': at_init['residual_var'], 'max_abs': at_init['max_abs']}] + lines
    extra = sorted({k for line in lines[1:] for k, v in line.items() if isinstance(v, list) and k not in BASE_KEYS})
    rows.append({
        'extra_layer_stats': {key: [line.get(key) for line in lines] for key in extra},
        'massive_activations_at_end': {k: v for k, v in lines[-1].items() if 'massive' in k},
        'run': run.name, 'placement': run.overrides['model.norm.placement'], 'seed': run.overrides['train.seed'],
        'steps': [line['step'] for line in lines],
        'residual_var': [line['residual_var'] for line in lines],
        'max_abs': [line['max_abs'] for line in lines],
        'fit_first': growth.fit_growth(first).to_dict(), 'fit_last': growth.fit_growth(last).to_dict(),
        'fits': [{'step': line['step'], **growth.fit_growth(line['residual_var']).to_dict()} for line in lines],
        'growth_over_training_by_layer': growth_over_training.tolist(),
        'max_growth_over_training': common.finite_or_none(np.nanmax(growth_over_training)),
        'final_loss': record.metrics[-1].get('loss') if record.metrics else None,
    })
  return rows


def group_fits(training_rows):
  """Per placement, the growth law across its seeds ([seeds, layers]) at every statistics step they share."""
  out = {}
  for placement, rows in by_placement(training_rows).items():
    steps = sorted(set.intersection(*[set(row['steps']) for row in rows]))
    fits = []
    for step in steps:
      values = [row['residual_var'][row['steps'].index(step)] for row in rows]
      if len({len(v) for v in values}) == 1:
        values = [[math.nan if v is None else v for v in value] for value in values]
        fits.append({'step': step, **growth.fit_growth(values).to_dict()})
    out[placement] = fits
  return out


def by_placement(training_rows):
  trained = {}
  for row in training_rows:
    trained.setdefault(row['placement'], []).append(row)
  return trained


def verdict(scale_rows, training_rows):
  by_scale = {row['placement']: row for row in scale_rows}
  checks = {}
  if 'pre' in by_scale and 'peri' in by_scale:
    pre, peri = by_scale['pre'], by_scale['peri']
    checks['pre_increment_scales_as_s2'] = abs(pre['exponent'] - 2) < 0.2
    checks['peri_increment_ignores_s'] = abs(peri['exponent']) < 0.05
  trained = by_placement(training_rows)
  fits = group_fits(training_rows)
  checks['verdict_across_seeds'] = {p: {'init': f[0]['verdict'], 'end': f[-1]['verdict'],
                                        'delta_aic_end': {law: v['delta_aic'] for law, v in f[-1]['laws'].items()}}
                                    for p, f in fits.items() if f}
  # log10 of the largest per-layer growth since init, per seed: a diverged seed (no finite growth) counts as inf.
  log_growth = {p: [math.log10(r['max_growth_over_training']) if r['max_growth_over_training'] else math.inf
                    for r in rows] for p, rows in trained.items()}
  checks['log10_max_growth_over_training'] = {p: report_lib.mean_std(v) for p, v in log_growth.items()}
  if 'pre' in trained and 'peri' in trained:
    comparison = common.compare(log_growth['pre'], log_growth['peri'])
    checks['pre_vs_peri_log10_growth'] = comparison
    checks['pre_variance_grows_more_than_peri_in_training'] = (comparison['difference'] or 0) > 0
    checks['pre_growth_over_100x'] = (comparison['a']['mean'] or 0) > 2   # "orders of magnitude" (paper: >10,000x)
  return checks


def plot(scale_rows, init_rows, training_rows, path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  trained = by_placement(training_rows)
  fig, axes = plt.subplots(2, max(3, len(trained)), figsize=(5 * max(3, len(trained)), 8), layout='constrained',
                           squeeze=False)
  for row in scale_rows:
    axes[0][0].loglog(row['scales'], row['ratio_to_s1'], 'o-', label=row['placement'],
                      color=plots.placement_color(row['placement']))
  if scale_rows:
    axes[0][0].loglog(scale_rows[0]['scales'], scale_rows[0]['expected_pre_ln'], 'k:', label='s²')
  axes[0][0].set(xlabel='output projection scale s', ylabel='variance increment / increment at s=1',
                 title='at init: increment per sub-layer vs s')
  for row in init_rows:
    axes[0][1].plot(range(1, len(row['residual_var']) + 1), row['residual_var'], 'o-', label=row['placement'],
                    color=plots.placement_color(row['placement']))
  axes[0][1].set(xlabel='layer', ylabel='residual variance', yscale='log', title='at init: variance by depth')
  for row in training_rows:
    if row['seed'] == 0:
      for index in (0, len(row['steps']) - 1):
        variance = np.asarray(row['residual_var'][index], dtype=np.float64)
        axes[0][2].plot(range(1, variance.size + 1), variance, 'o-' if index else 'x--',
                        label=f'{row["placement"]} step {row["steps"][index]}',
                        color=plots.placement_color(row['placement']))
  axes[0][2].set(xlabel='layer', ylabel='residual variance', yscale='log',
                 title='training (seed 0): init and last stats step')
  for ax in axes[0]:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  for ax, (placement, rows) in zip(axes[1], trained.items()):   # layer x step heatmap, seed 0
    row = next((r for r in rows if r['seed'] == 0), rows[0])
    with np.errstate(all='ignore'):
      image = np.log10(np.asarray([[math.nan if v is None else v for v in line] for line in row['residual_var']],
                                  dtype=np.float64)).T
    mesh = ax.pcolormesh(np.arange(len(row['steps']) + 1), np.arange(1, image.shape[0] + 2), image, shading='flat')
    ax.set_xticks(np.arange(len(row['steps'])) + 0.5, [str(s) for s in row['steps']], fontsize=6, rotation=90)
    ax.set(xlabel='step', ylabel='layer', title=f'{placement} (seed 0): log10 residual variance')
    fig.colorbar(mesh, ax=ax)
  for ax in axes[1][len(trained):]:
    ax.axis('off')
  return plots.save_figure(fig, path)


def define_flags():
  common.define_flags(NAME, seeds=3)
  flags.DEFINE_list('placements', ['pre', 'peri'], 'Placements to train and measure.')
  common.define_number_list('scales', [1, 2, 4, 8, 16], 'Output-projection scales for the at-init test, ascending.')
  flags.DEFINE_integer('init_batch', 4, 'Sequences in the at-init forward pass.')


def main(argv):
  del argv
  start = time.time()
  setup = common.setup_from_flags(SMALL, PAPER)
  grid = [('model.norm.placement', FLAGS.placements)]
  runs = common.plan(setup, grid, FLAGS.seeds, FLAGS.root)
  scales = FLAGS.scales
  if not common.execute(setup, runs, FLAGS.root):
    return
  print(f'trained in {time.time() - start:.0f}s; measuring at init')
  scale_rows = scale_test(setup, FLAGS.placements, scales, FLAGS.init_batch)
  init_rows = init_profiles(setup, FLAGS.placements, FLAGS.init_batch)
  training_rows = training_profiles(setup, runs, common.load_records(runs), FLAGS.init_batch)
  data = {'settings': common.settings(setup, grid, FLAGS.seeds, FLAGS.root), 'scale_test': scale_rows,
          'init': init_rows, 'training': training_rows, 'group_fits': group_fits(training_rows),
          'checks': verdict(scale_rows, training_rows)}
  plot(scale_rows, init_rows, training_rows, os.path.join(FLAGS.results, f'{NAME}.png'))
  print(report(data))
  data['settings']['wall_seconds'] = round(time.time() - start)
  print('wrote', common.write_json(FLAGS.results, NAME, data))


def fit_text(fit):
  """The verdict and each law's ΔAIC to the best (perijax/growth.py)."""
  if not fit['laws']:
    return f'{fit["verdict"]} ({fit["note"]})'
  return f'{fit["verdict"]} (ΔAIC ' + ', '.join(f'{law} {f["delta_aic"]:.1f}' for law, f in fit['laws'].items()) + ')'


def report(data):
  lines = ['at init: mean variance increment per sub-layer relative to s=1 (Pre-LN expected s², Peri-LN 1)']
  for row in data['scale_test']:
    lines.append(f'  {row["placement"]:>8}: ' + '  '.join(f's={s:g}: {r:.3g}' for s, r in
                                                          zip(row['scales'], row['ratio_to_s1']))
                 + f'  (exponent {row["exponent"]:.3f})')
  lines.append('at init: growth law of residual variance with depth')
  for row in data['init']:
    fit = row['fit']
    lines.append(f'  {row["placement"]:>8}: {fit_text(fit)}, Var L / Var 1 = {fit["growth_ratio"]:.3g}')
  lines.append('training: growth law at init (step 0) and the last stats step; max over layers of Var(last)/Var(init)')
  for row in data['training']:
    lines.append(f'  {row["run"]}: first {row["fit_first"]["verdict"]}, last {fit_text(row["fit_last"])}, max growth '
                 f'{tables.format_number(row["max_growth_over_training"])}x, final loss '
                 f'{tables.format_number(row["final_loss"])}')
  lines.append('training: growth law across seeds per placement (init -> end)')
  for placement, fits in data.get('group_fits', {}).items():
    if fits:
      lines.append(f'  {placement:>8}: step {fits[0]["step"]} {fit_text(fits[0])} -> step {fits[-1]["step"]} '
                   f'{fit_text(fits[-1])}')
  checks = data['checks']
  if 'pre_vs_peri_log10_growth' in checks:
    lines.append('  log10 max growth over training: ' +
                 common.compare_text('pre', 'peri', checks['pre_vs_peri_log10_growth']))
  lines.append(f'checks: {checks}')
  return '\n'.join(lines)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
