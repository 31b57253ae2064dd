r"""docs/paper.md claim 4: per-layer gradient norms are ordered Post-LN > Pre-LN > Peri-LN, and flatter across depth for
Peri-LN.

    python -m experiments.grad_norms                               # small scale: post/pre/peri × 2 seeds, ~5 min
    python -m experiments.grad_norms --config=configs/paper_400m.py --print          # paper scale, for a scheduler

Each run logs the L2 norm of each layer's raw gradient (before clipping; `layer_grad_norm` in metrics.jsonl) every
train.log_every steps. Per placement: the per-layer profile averaged over logged steps and then over seeds; its level
(mean over layers), its spread across depth (max/min over layers, and the coefficient of variation std/mean), both for
the whole run and for the first third of it (early training, where perijax expects the placements to differ most).
The claim holds at this scale when the levels are ordered post > pre > peri and peri's coefficient of variation is
the smallest.
Writes results/grad_norms.json and results/grad_norms.png.
"""

import os
import time

from absl import app
from absl import flags
import numpy as np

from experiments import common
from perijax import plots

NAME = 'grad_norms'
SMALL = {'model.num_layers': 8, 'train.steps': 100, 'train.batch_size': 8, 'train.seq_len': 64,
         'train.log_every': 5, 'train.stats_every': 50, 'checkpoint.every': 0}
FLAGS = flags.FLAGS


def profile(record, fraction=1.0):
  """Mean layer_grad_norm over the logged steps in the first `fraction` of the run (finite values only)."""
  lines = [line for line in record.metrics if line.get('layer_grad_norm')]
  if not lines:
    return None
  last_step = lines[-1]['step']
  chosen = [line for line in lines if line['step'] <= fraction * last_step] or lines[:1]
  stacked = np.asarray([line['layer_grad_norm'] for line in chosen], dtype=np.float64)
  stacked[~np.isfinite(stacked)] = np.nan
  return np.nanmean(stacked, axis=0)


def spread(values):
  values = np.asarray(values, dtype=np.float64)
  return {'level': float(np.mean(values)), 'max_over_min': float(values.max() / values.min()),
          'cv': float(np.std(values) / np.mean(values))}


def summarize(runs, records):
  rows = []
  groups = common.by_group(runs, records, ('model.norm.placement',))
  for (placement,), members in groups.items():
    row = {'placement': placement, 'n_seeds': len(members)}
    for label, fraction in (('whole_run', 1.0), ('first_third', 1 / 3)):
      profiles = [p for p in (profile(record, fraction) for record in members) if p is not None]
      if not profiles:
        continue
      mean_profile = np.mean(profiles, axis=0)
      per_seed = [spread(p) for p in profiles]
      row[label] = {'profile': mean_profile.tolist(), **spread(mean_profile),
                    'level_per_seed': [s['level'] for s in per_seed], 'cv_per_seed': [s['cv'] for s in per_seed]}
    row['final_loss'] = [record.metrics[-1].get('loss') for record in members if record.metrics]
    rows.append(row)
  return rows


def checks(rows):
  by_placement = {row['placement']: row for row in rows if 'whole_run' in row}
  out = {}
  for label in ('whole_run', 'first_third'):
    levels = {p: row[label]['level'] for p, row in by_placement.items() if label in row}
    cvs = {p: row[label]['cv'] for p, row in by_placement.items() if label in row}
    result = {'levels': levels, 'cv': cvs, 'order_by_level': sorted(levels, key=levels.get, reverse=True)}
    if {'post', 'pre', 'peri'} <= set(levels):
      result['post_gt_pre_gt_peri'] = levels['post'] > levels['pre'] > levels['peri']
      result['peri_flattest'] = min(cvs, key=cvs.get) == 'peri'
    out[label] = result
  return out


def plot(rows, path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout='constrained')
  for ax, label in zip(axes, ('whole_run', 'first_third')):
    for row in rows:
      if label in row:
        values = row[label]['profile']
        ax.plot(range(1, len(values) + 1), values, 'o-', label=f'{row["placement"]} (mean {row[label]["level"]:.3g})',
                color=plots.placement_color(row['placement']))
    ax.set(xlabel='layer', ylabel='gradient norm', yscale='log',
           title=f'per-layer gradient norm, {label.replace("_", " ")} (mean over steps and seeds)')
    ax.legend(fontsize=7)
  return plots.save_figure(fig, path)


def define_flags():
  common.define_flags(NAME, seeds=2)
  flags.DEFINE_list('placements', ['post', 'pre', 'peri'], 'Placements to compare.')


def main(argv):
  del argv
  start = time.time()
  setup = common.setup_from_flags(SMALL)
  grid = [('model.norm.placement', FLAGS.placements)]
  runs = common.plan(setup, grid, FLAGS.seeds, FLAGS.root)
  if not common.execute(setup, runs, FLAGS.root):
    return
  rows = summarize(runs, common.load_records(runs))
  data = {'settings': {**common.settings(setup, grid, FLAGS.seeds, FLAGS.root),
                       'wall_seconds': round(time.time() - start)},
          'placements': rows, 'checks': checks(rows)}
  plot(rows, os.path.join(FLAGS.results, f'{NAME}.png'))
  for row in rows:
    whole = row.get('whole_run', {})
    print(f'{row["placement"]:>8}: level {whole.get("level", float("nan")):.4g}  max/min '
          f'{whole.get("max_over_min", float("nan")):.3g}  cv {whole.get("cv", float("nan")):.3g}  '
          f'profile {np.round(whole.get("profile", []), 4).tolist()}')
  print(f'checks: {data["checks"]}')
  print('wrote', common.write_json(FLAGS.results, NAME, data))


if __name__ == '__main__':
  define_flags()
  app.run(main)
