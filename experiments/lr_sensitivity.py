r"""Learning-rate sensitivity of each placement (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities", arXiv:2309.14322): which placement keeps training well as the learning rate rises?

    python -m experiments.lr_sensitivity                            # small scale, ~90 min on 2 CPU cores
    python -m experiments.lr_sensitivity --config=configs/paper_400m.py --print       # 400M, for a scheduler

Grid: variants post, pre, peri, output and pre with qk_norm in float32, and pre and peri in float16 with dynamic loss
scaling (--fp16_placements) × --lrs (7 log-spaced from 1e-4 to 1e-1) × --depths (4 and 16 layers) × --seeds (3).
Each run's workdir is named by placement, qk_norm, compute_dtype, lr, num_layers and seed (perijax.sweep).

Per variant and depth:
  * final loss against lr: the mean of the logged training losses over the last 10% of the run (each already a mean
    over its logging window; one line is still noisy), mean ± std over seeds; a seed whose loss went non-finite
    counts as L_init (below);
  * LR sensitivity (Wortsman et al., section 3): E_lr[min(L(lr), L_init)] - min_lr L(lr), L_init the loss at step 1
    (the model at initialization); 0 = the same loss at every lr of the grid; per seed and as mean ± std;
  * divergences by perijax/instability.py's rule (k/n per lr);
  * the largest attention logit per layer at the last statistics step (`attn_logit_max`, when the runs record it).
Comparisons (pre against peri, each against the best) give mean ± std and whether the difference exceeds the seed
spread (experiments.common.compare).

Small-scale size, and why: d_model 64, 4 heads, sequences of 64 tokens, batch 8, 200 steps (20 warmup, cosine),
statistics only at the last step. At this size a run costs mostly its compilation, not its steps (measured with
os.times on a loaded 2-core machine: a 4-layer run 19 CPU-seconds for 20 steps and 24 for 220; a 16-layer run 29 and
49), and experiments.common's compilation cache lets the 2nd and 3rd seed skip compiling (19 -> 3 CPU-seconds). So
per lr and depth, 3 seeds cost ~37 CPU-seconds at 4 layers and ~97 at 16: ~6,600 CPU-seconds for the 294 runs, about
90 minutes on two cores. 200 steps of 512 tokens take the byte-level loss well below L_init at a good lr while the
smallest lrs barely move it and the largest blow up, so the loss-vs-lr curves have a clear minimum and the seed spread
is small next to the differences along the grid: the curves rank. Wider or longer runs would rank the same way
(Wortsman et al. see LR sensitivity in small models) but would not fit 90 minutes.
Paper scale (PAPER): the 400M shape at 12 and 24 layers, 5,000 steps (2.6B tokens) per run: enough for a high lr to
diverge or not, while a 57k-step run per grid point would be the paper's whole budget many times over.
Writes results/lr_sensitivity.json and results/lr_sensitivity.png.
"""

import math
import os
import time

from absl import flags
import numpy as np

from experiments import common
from perijax import cli
from perijax import plots
from perijax import stats
from perijax import tables

NAME = 'lr_sensitivity'
SMALL = {'model.d_model': 64, 'model.num_heads': 4, 'model.softmax_in_float32': False, 'train.steps': 200,
         'train.batch_size': 8, 'train.seq_len': 64, 'train.log_every': 10, 'train.stats_every': 200,
         'train.divergence_steps': 30, 'optimizer.warmup_steps': 20, 'checkpoint.every': 0}
# model.softmax_in_float32=False: XLA:CPU cannot run float16 attention with a float32 softmax (see fp16_stability);
# it changes nothing in the float32 runs.
PAPER = {'train.steps': 5000, 'train.stats_every': 500, 'optimizer.warmup_steps': 500, 'checkpoint.every': 1000}
FIELDS = ('model.norm.placement', 'model.norm.qk_norm', 'model.compute_dtype')
GROUP_FIELDS = FIELDS + ('model.num_layers', 'optimizer.lr')
FINAL_FRACTION = 0.1
FLAGS = flags.FLAGS


def variant_name(placement, qk_norm, dtype):
  return placement + ('+qk_norm' if qk_norm else '') + ('/float16' if dtype == 'float16' else '')


def grids(placements, qk_placements, fp16_placements, lrs, depths):
  """The sub-grids (each a perijax.sweep grid over the same fields, so every workdir is named alike); an empty
  placement list leaves its sub-grid out."""
  variants = ((placements, False, 'float32'), (qk_placements, True, 'float32'), (fp16_placements, False, 'float16'))
  out = [[('model.norm.placement', names), ('model.norm.qk_norm', [qk_norm]), ('model.compute_dtype', [dtype]),
          ('optimizer.lr', lrs), ('model.num_layers', depths)] for names, qk_norm, dtype in variants if names]
  if not out:
    raise cli.ArgumentError('--placements, --qk_placements and --fp16_placements are all empty; give at least one')
  return out


def final_loss(record):
  """Mean logged loss over the last FINAL_FRACTION of the run; inf if any of those is not finite."""
  lines = [line for line in record.metrics if line.get('loss') is not None]
  if not lines:
    return math.inf
  last = lines[-1]['step']
  tail = [float(line['loss']) for line in lines if line['step'] >= (1 - FINAL_FRACTION) * last] or [lines[-1]['loss']]
  return float(np.mean(tail)) if all(map(math.isfinite, tail)) else math.inf


def initial_loss(record):
  lines = [line for line in record.metrics if line.get('loss') is not None]
  return float(lines[0]['loss']) if lines and math.isfinite(lines[0]['loss']) else None


def sensitivity(curve, l_init):
  """Wortsman et al.'s LR sensitivity of one loss-against-lr curve: mean of min(L, L_init) minus the best L."""
  capped = np.minimum(np.asarray(curve, np.float64), l_init)
  return float(capped.mean() - capped.min())


def attn_logit_max(record):
  lines = [line for line in record.metrics if line.get('attn_logit_max')]
  return [float(v) if v is not None else math.nan for v in lines[-1]['attn_logit_max']] if lines else None


def summarize(runs, records):
  """One row per (variant, depth): per lr the seeds' final losses, divergences and attention logits; sensitivity."""
  points = common.by_group(runs, records, GROUP_FIELDS)
  rows = {}
  for (placement, qk_norm, dtype, depth, lr), members in points.items():
    row = rows.setdefault((variant_name(placement, qk_norm, dtype), depth), {
        'variant': variant_name(placement, qk_norm, dtype), 'placement': placement, 'qk_norm': qk_norm,
        'compute_dtype': dtype, 'num_layers': depth, 'lrs': [], 'final_loss_per_seed': [], 'final_loss': [],
        'diverged': [], 'diverged_at': [], 'n_seeds': len(members), 'attn_logit_max': [], 'l_init_per_run': []})
    divergences = [common.divergence(record) for record in members]
    row['lrs'].append(lr)
    row['final_loss_per_seed'].append([final_loss(record) for record in members])
    row['diverged'].append(sum(d.diverged for d in divergences))
    row['diverged_at'].append([d.step for d in divergences])
    row['l_init_per_run'] += [initial_loss(record) for record in members]
    logits = [v for v in (attn_logit_max(record) for record in members) if v is not None]
    row['attn_logit_max'].append(np.nanmean(logits, axis=0).tolist() if logits else None)
  for row in rows.values():
    inits = [v for v in row.pop('l_init_per_run') if v is not None]
    l_init = float(np.mean(inits)) if inits else math.inf
    per_seed = np.minimum(np.asarray(row['final_loss_per_seed'], np.float64), l_init)   # [lrs, seeds]
    row['l_init'] = l_init
    row['final_loss'] = [common.report_lib.mean_std(losses) for losses in per_seed]
    row['sensitivity_per_seed'] = [sensitivity(per_seed[:, s], l_init) for s in range(per_seed.shape[1])]
    row['sensitivity'] = common.report_lib.mean_std(row['sensitivity_per_seed'])
    row['best_lr'] = row['lrs'][int(np.argmin(per_seed.mean(1)))]
    row['final_loss_per_seed'] = [[common.finite_or_none(v) for v in losses] for losses in row['final_loss_per_seed']]
    logit_maxima = [stats.overflow_max(v) for v in row['attn_logit_max'] if v]
    row['largest_attn_logit'] = stats.overflow_max(logit_maxima)
  return list(rows.values())


def checks(rows):
  """Per depth: variants ranked by mean sensitivity; pre against peri (float32 and float16) and each variant against
  the least sensitive, on the per-seed sensitivities, with whether the difference exceeds the seed spread."""
  out = {}
  for depth in sorted({row['num_layers'] for row in rows}):
    at_depth = {row['variant']: row for row in rows if row['num_layers'] == depth}
    ranked = sorted(at_depth, key=lambda v: at_depth[v]['sensitivity']['mean'] or math.inf)
    entry = {'ranked_by_sensitivity': ranked,
             'vs_least_sensitive': {v: common.compare(at_depth[v]['sensitivity_per_seed'],
                                                      at_depth[ranked[0]]['sensitivity_per_seed'])
                                    for v in ranked[1:]}}
    for a, b in (('pre', 'peri'), ('pre/float16', 'peri/float16')):
      if a in at_depth and b in at_depth:
        entry[f'{a}_vs_{b}'] = common.compare(at_depth[a]['sensitivity_per_seed'],
                                              at_depth[b]['sensitivity_per_seed'])
    entry['divergences'] = {v: sum(row['diverged']) for v, row in at_depth.items()}
    out[f'{depth}_layers'] = entry
  return out


def color_of(variant, index):
  colors = getattr(plots, 'PLACEMENT_COLORS', {})   # the plots' placement colours, where the module defines them
  return colors.get(variant.split('+')[0].split('/')[0], f'C{index % 10}')


def line_style(row):
  """Dashed for float16, dotted for QK-norm: the variants of one placement share its colour."""
  return '--' if row['compute_dtype'] == 'float16' else ':' if row['qk_norm'] else '-'


def plot(rows, path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  depths = sorted({row['num_layers'] for row in rows})
  has_logits = any(row['largest_attn_logit'] is not None for row in rows)
  fig, axes = plt.subplots(2 if has_logits else 1, len(depths), figsize=(6 * len(depths), 8 if has_logits else 4.2),
                           layout='constrained', squeeze=False)
  variants = list(dict.fromkeys(row['variant'] for row in rows))
  for column, depth in enumerate(depths):
    ax = axes[0][column]
    for row in (r for r in rows if r['num_layers'] == depth):
      index = variants.index(row['variant'])
      mean = np.asarray([c['mean'] if c['mean'] is not None else np.nan for c in row['final_loss']])
      std = np.asarray([c['std'] or 0.0 for c in row['final_loss']])
      ax.plot(row['lrs'], mean, line_style(row), marker='o', color=color_of(row['variant'], index),
              label=f'{row["variant"]} (sens. {common.report_lib.format_mean_std(row["sensitivity"])})')
      ax.fill_between(row['lrs'], mean - std, mean + std, color=color_of(row['variant'], index), alpha=0.15)
    ax.axhline(np.mean([r['l_init'] for r in rows if r['num_layers'] == depth]), color='k', linestyle=':',
               linewidth=0.8, label='L_init')
    ax.set(xscale='log', xlabel='peak learning rate', ylabel='final training loss (mean ± std over seeds)',
           title=f'{depth} layers: final loss vs lr')
    ax.legend(fontsize=6)
    if has_logits:
      ax = axes[1][column]
      for row in (r for r in rows if r['num_layers'] == depth):
        values = [stats.overflow_max(v) if v else np.nan for v in row['attn_logit_max']]
        color = color_of(row['variant'], variants.index(row['variant']))
        ax.plot(row['lrs'], values, line_style(row), marker='o', color=color, label=row['variant'])
      ax.set(xscale='log', yscale='log', xlabel='peak learning rate', ylabel='largest attention logit (any layer)',
             title=f'{depth} layers: attention logits at the end')
      ax.legend(fontsize=6)
  return plots.save_figure(fig, path)


def table(rows):
  lrs = sorted({lr for row in rows for lr in row['lrs']})
  headers = ['variant', 'layers'] + [f'lr {lr:.2g}' for lr in lrs] + ['sensitivity', 'diverged', 'max logit']
  body = []
  for row in rows:
    cells = {lr: common.report_lib.format_mean_std(cell) for lr, cell in zip(row['lrs'], row['final_loss'])}
    body.append([row['variant'], str(row['num_layers'])] + [cells.get(lr, '-') for lr in lrs] +
                [common.report_lib.format_mean_std(row['sensitivity']),
                 f'{sum(row["diverged"])}/{row["n_seeds"] * len(row["lrs"])}',
                 tables.format_number(row['largest_attn_logit'])])
  return tables.format_table([headers], body, keep=2)


def define_flags():
  common.define_flags(NAME, seeds=3)
  flags.DEFINE_list('placements', ['post', 'pre', 'peri', 'output'], 'float32 placements.')
  flags.DEFINE_list('qk_placements', ['pre'], 'float32 placements also run with model.norm.qk_norm=true.')
  flags.DEFINE_list('fp16_placements', ['pre', 'peri'], 'Placements also run in float16 with loss scaling.')
  common.define_number_list('lrs', [f'{v:.3g}' for v in np.logspace(-4, -1, 7)], 'Peak learning rates.')
  common.define_number_list('depths', [], 'Layer counts (default: 4 and 16 at small scale; half and all of the '
                            'config\'s).', kind=int)


def depths_for(setup, depths):
  if depths:
    return list(depths)
  return [4, 16] if setup.small_scale else [setup.config.model.num_layers // 2, setup.config.model.num_layers]


def main(argv):
  del argv
  start = time.time()
  setup = common.setup_from_flags(SMALL, PAPER)
  lrs, depths = FLAGS.lrs, depths_for(setup, FLAGS.depths)
  sub_grids = grids(FLAGS.placements, FLAGS.qk_placements, FLAGS.fp16_placements, lrs, depths)
  runs = [run for grid in sub_grids for run in common.plan(setup, grid, FLAGS.seeds, FLAGS.root)]
  if not common.execute(setup, runs, FLAGS.root):
    return
  rows = summarize(runs, common.load_records(runs))
  data = {'settings': {**common.settings(setup, sub_grids[0], FLAGS.seeds, FLAGS.root), 'grids': sub_grids,
                       'wall_seconds': round(time.time() - start), 'runs': len(runs)},
          'rows': rows, 'checks': checks(rows)}
  plot(rows, os.path.join(FLAGS.results, f'{NAME}.png'))
  print(table(rows))
  for depth, entry in data['checks'].items():
    print(f'{depth}: ranked by sensitivity {entry["ranked_by_sensitivity"]}')
    for key in ('pre_vs_peri', 'pre/float16_vs_peri/float16'):
      if key in entry:
        print(f'  {common.compare_text(*key.split("_vs_"), entry[key])}')
  print('wrote', common.write_json(FLAGS.results, NAME, data))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
