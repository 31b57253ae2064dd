r"""`pre_post` (a widely read summary's drawing, x <- N_out(x + F(N_in(x)))) against `peri` (the paper's Eq. 3,
x <- x + N_out(F(N_in(x)))): docs/paper.md says why they are different architectures. This shows how they differ.

    python -m experiments.pre_post_vs_peri                         # small scale: peri/pre_post × 3 seeds, ~8 min
    python -m experiments.pre_post_vs_peri --config=configs/paper_400m.py --print     # paper scale, for a scheduler

  1. The summary's toy example, recomputed: a unit-variance LayerNorm (no eps, no gain) of [2, 0, -2] and of the
     residual sum [3.22, 0, -3.22].
  2. At initialization: the residual variance after each layer and its growth-law fit. Peri-LN adds a normalized term
     per sub-layer (variance grows ~linearly); pre_post normalizes the stream itself (variance pinned near 1).
  3. Training (--seeds each): final training loss (mean ± std), eval loss with --evaluate, the per-layer residual
     variance and gradient norm at the end.
Writes results/pre_post_vs_peri.json and results/pre_post_vs_peri.png.
"""

import os
import time

from absl import flags
import numpy as np

from experiments import common
from perijax import cli
from perijax import errors
from perijax import growth
from perijax import plots
from perijax import report as report_lib

NAME = 'pre_post_vs_peri'
SMALL = {'model.num_layers': 8, 'train.steps': 150, 'train.batch_size': 8, 'train.seq_len': 128,
         'train.stats_every': 25, 'checkpoint.every': 0}
PLACEMENTS = ('peri', 'pre_post')
FLAGS = flags.FLAGS


def unit_layernorm(x):
  x = np.asarray(x, dtype=np.float64)
  return (x - x.mean()) / x.std()


def toy_example():
  normalized = unit_layernorm([2.0, 0.0, -2.0])
  summed = np.asarray([2.0, 0.0, -2.0]) + normalized
  return {'input': [2.0, 0.0, -2.0], 'layernorm_of_input': normalized.round(4).tolist(),
          'residual_sum': summed.round(4).tolist(), 'layernorm_of_sum': unit_layernorm(summed).round(4).tolist(),
          'summary_claims_layernorm_of_sum': [1.37, 0.0, -1.37],
          'note': 'a unit-variance LayerNorm of any [a, 0, -a] is [1.2247, 0, -1.2247]: the summary\'s 1.37 is off'}


def init_profiles(setup, batch_size):
  rows = []
  for placement in PLACEMENTS:
    summary, = common.init_layer_stats(setup.resolved({'model.norm.placement': placement}), 0, batch_size)
    rows.append({'placement': placement, 'residual_var': summary['residual_var'],
                 'fit': growth.fit_growth(summary['residual_var']).to_dict()})
  return rows


def summarize(runs, records):
  """Per placement: losses over seeds, and the per-layer residual variance and gradient norms at each run's last
  logged line of them (NotFoundError, before any analysis, when a run has none yet)."""
  unready = [record.workdir for record in records if not all(any(line.get(key) for line in record.metrics)
                                                             for key in ('residual_var', 'layer_grad_norm'))]
  if unready:
    raise errors.NotFoundError(f'{len(unready)} run(s) have no per-layer statistics yet, e.g. {unready[0]} (no '
                               'residual_var or layer_grad_norm logged); train them past a statistics step')
  rows = []
  for (placement,), members in common.by_group(runs, records, ('model.norm.placement',)).items():
    summaries = [report_lib.summarize_run(record) for record in members]
    last_stats = [[line for line in record.metrics if line.get('residual_var')][-1] for record in members]
    grad_lines = [[line for line in record.metrics if line.get('layer_grad_norm')] for record in members]
    final_var = np.mean([line['residual_var'] for line in last_stats], axis=0)
    rows.append({
        'placement': placement, 'n_seeds': len(members),
        'per_seed_final_loss': [s['final_loss'] for s in summaries],
        'final_loss': report_lib.mean_std([s['final_loss'] for s in summaries]),
        'eval_loss': report_lib.mean_std([s['eval_loss'] for s in summaries]),
        'diverged': sum(s['diverged'] for s in summaries),
        'final_residual_var': final_var.tolist(), 'final_fit': growth.fit_growth(final_var).to_dict(),
        'final_layer_grad_norm': np.mean([lines[-1]['layer_grad_norm'] for lines in grad_lines], axis=0).tolist(),
        'loss_curves': [[(line['step'], line['loss']) for line in record.metrics if line.get('loss') is not None]
                        for record in members],
    })
  return rows


def plot(init_rows, rows, path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout='constrained')
  for row in init_rows:
    axes[0].plot(range(1, len(row['residual_var']) + 1), row['residual_var'], 'o-', label=row['placement'],
                 color=plots.placement_color(row['placement']))
  axes[0].set(xlabel='layer', ylabel='residual variance', yscale='log', title='at init')
  for row in rows:
    axes[1].plot(range(1, len(row['final_residual_var']) + 1), row['final_residual_var'], 'o-',
                 label=row['placement'], color=plots.placement_color(row['placement']))
    for i, curve in enumerate(row['loss_curves']):
      axes[2].plot(*zip(*curve), plots.LINESTYLES[i % len(plots.LINESTYLES)], linewidth=1,
                   label=f'{row["placement"]} seed {i}', color=plots.placement_color(row['placement']))
  axes[1].set(xlabel='layer', ylabel='residual variance', yscale='log', title='end of training (mean over seeds)')
  axes[2].set(xlabel='step', ylabel='training loss', title='loss')
  for ax in axes:
    ax.legend(fontsize=7)
  return plots.save_figure(fig, path)


def define_flags():
  common.define_flags(NAME, seeds=3)
  flags.DEFINE_integer('init_batch', 4, 'Sequences in the at-init forward pass.')


def main(argv):
  del argv
  start = time.time()
  setup = common.setup_from_flags(SMALL)
  grid = [('model.norm.placement', list(PLACEMENTS))]
  runs = common.plan(setup, grid, FLAGS.seeds, FLAGS.root)
  if not common.execute(setup, runs, FLAGS.root):
    return
  rows = summarize(runs, common.load_records(runs))
  init_rows = init_profiles(setup, FLAGS.init_batch)
  data = {'settings': {**common.settings(setup, grid, FLAGS.seeds, FLAGS.root),
                       'wall_seconds': round(time.time() - start)},
          'toy_example': toy_example(), 'init': init_rows, 'training': rows}
  by_placement = {row['placement']: row['per_seed_final_loss'] for row in rows}
  if set(PLACEMENTS) <= set(by_placement):
    data['final_loss_peri_vs_pre_post'] = common.compare(by_placement['peri'], by_placement['pre_post'])
  plot(init_rows, rows, os.path.join(FLAGS.results, f'{NAME}.png'))
  print(f'toy example: {data["toy_example"]}')
  for row in init_rows:
    print(f'at init {row["placement"]:>8}: residual var {np.round(row["residual_var"], 3).tolist()} '
          f'({row["fit"]["verdict"]})')
  for row in rows:
    print(f'trained {row["placement"]:>8}: final loss {report_lib.format_mean_std(row["final_loss"])}, eval loss '
          f'{report_lib.format_mean_std(row["eval_loss"])}, diverged {row["diverged"]}/{row["n_seeds"]}, final '
          f'residual var {np.round(row["final_residual_var"], 3).tolist()}')
  if 'final_loss_peri_vs_pre_post' in data:
    print('final loss:', common.compare_text('peri', 'pre_post', data['final_loss_peri_vs_pre_post']))
  print('wrote', common.write_json(FLAGS.results, NAME, data))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
