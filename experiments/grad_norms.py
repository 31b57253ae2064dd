r"""docs/paper.md claim 4: per-layer gradient norms are ordered Post-LN > Pre-LN > Peri-LN, and flatter across depth for
Peri-LN.

    python -m experiments.grad_norms                               # small scale: post/pre/peri × 3 seeds, ~5 min
    python -m experiments.grad_norms --config=configs/paper_400m.py --print          # paper scale, for a scheduler

Each run logs the L2 norm of each layer's raw gradient (before clipping; `layer_grad_norm` in metrics.jsonl) every
train.log_every steps, as the mean over the steps since the previous line (`window_summary` in perijax/metrics.py), and
always at step 1 (the model at initialization, a single step) and at the last step. Per placement, for two snapshots, at
init (the first logged line whose norms are finite: step 1 unless a float16 loss scale was still searching) and at the
end (the last line: the mean over the last logging window), and for the average over the whole run (over its lines): the
per-layer profile (mean over seeds), its level (mean over layers), its spread across depth (max/min over layers, and the
coefficient of variation std/mean), and the level and cv per seed. Post against Pre and Pre against Peri: mean ± std of
the per-seed levels and whether the difference exceeds the seed spread. The claim holds at this scale when the levels
are ordered post > pre > peri beyond the seed spread and peri's coefficient of variation is the smallest.
Writes results/grad_norms.json and results/grad_norms.png.
"""

import os
import time

from absl import flags
import numpy as np

from experiments import common
from perijax import cli
from perijax import plots

NAME = 'grad_norms'
SMALL = {'model.num_layers': 8, 'train.steps': 300, 'train.batch_size': 8, 'train.seq_len': 64,
         'train.log_every': 10, 'train.stats_every': 150, 'checkpoint.every': 0}
PAPER = {'train.steps': 2000, 'train.log_every': 50, 'train.stats_every': 500}   # the 400M shape; init and 2,000 steps
SNAPSHOTS = ('at_init', 'at_end', 'whole_run')
FLAGS = flags.FLAGS


def profile(record, snapshot):
  """layer_grad_norm at init (first finite logged line), at the end (last line), or averaged over the whole run."""
  lines = [line for line in record.metrics if line.get('layer_grad_norm')]
  stacked = np.asarray([[np.nan if v is None else v for v in line['layer_grad_norm']] for line in lines],
                       dtype=np.float64)
  stacked[~np.isfinite(stacked)] = np.nan
  finite = [row for row in stacked if np.all(np.isfinite(row))]
  if not finite:
    return None
  if snapshot == 'at_init':
    return finite[0]
  if snapshot == 'at_end':
    return stacked[-1]
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
    for label in SNAPSHOTS:
      profiles = [p for p in (profile(record, label) for record in members) if p is not None]
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
  for label in SNAPSHOTS:
    levels = {p: row[label]['level'] for p, row in by_placement.items() if label in row}
    cvs = {p: row[label]['cv'] for p, row in by_placement.items() if label in row}
    result = {'levels': levels, 'cv': cvs, 'order_by_level': sorted(levels, key=levels.get, reverse=True)}
    if {'post', 'pre', 'peri'} <= set(levels):
      result['post_gt_pre_gt_peri'] = levels['post'] > levels['pre'] > levels['peri']
      result['peri_flattest'] = min(cvs, key=cvs.get) == 'peri'
    for a, b in (('post', 'pre'), ('pre', 'peri')):
      if a in by_placement and b in by_placement and label in by_placement[a] and label in by_placement[b]:
        result[f'{a}_vs_{b}_level'] = common.compare(by_placement[a][label]['level_per_seed'],
                                                     by_placement[b][label]['level_per_seed'])
        result[f'{a}_vs_{b}_cv'] = common.compare(by_placement[a][label]['cv_per_seed'],
                                                  by_placement[b][label]['cv_per_seed'])
    out[label] = result
  return out


def plot(rows, path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(SNAPSHOTS), figsize=(5.5 * len(SNAPSHOTS), 4), layout='constrained')
  for ax, label in zip(axes, SNAPSHOTS):
    for row in rows:
      if label in row:
        values = row[label]['profile']
        ax.plot(range(1, len(values) + 1), values, 'o-', label=f'{row["placement"]} (mean {row[label]["level"]:.3g})',
                color=plots.placement_color(row['placement']))
    ax.set(xlabel='layer', ylabel='gradient norm', yscale='log',
           title=f'per-layer gradient norm, {label.replace("_", " ")} (mean over seeds)')
    ax.legend(fontsize=7)
  return plots.save_figure(fig, path)


def define_flags():
  common.define_flags(NAME, seeds=3)
  flags.DEFINE_list('placements', ['post', 'pre', 'peri'], 'Placements to compare.')


def main(argv):
  del argv
  start = time.time()
  setup = common.setup_from_flags(SMALL, PAPER)
  grid = [('model.norm.placement', FLAGS.placements)]
  runs = common.plan(setup, grid, FLAGS.seeds, FLAGS.root)
  if not common.execute(setup, runs, FLAGS.root):
    return
  rows = summarize(runs, common.load_records(runs))
  data = {'settings': {**common.settings(setup, grid, FLAGS.seeds, FLAGS.root),
                       'wall_seconds': round(time.time() - start)},
          'placements': rows, 'checks': checks(rows)}
  plot(rows, os.path.join(FLAGS.results, f'{NAME}.png'))
  for label in SNAPSHOTS:
    for row in rows:
      snap = row.get(label, {})
      print(f'{label:>9} {row["placement"]:>8}: level {snap.get("level", float("nan")):.4g}  max/min '
            f'{snap.get("max_over_min", float("nan")):.3g}  cv {snap.get("cv", float("nan")):.3g}  '
            f'profile {np.round(snap.get("profile", []), 4).tolist()}')
    for key, comparison in data['checks'][label].items():
      if '_vs_' in key:
        print(f'  {label} {key}: ' + common.compare_text(*key.rsplit('_', 1)[0].split('_vs_'), comparison))
  print(f'checks: {data["checks"]}')
  print('wrote', common.write_json(FLAGS.results, NAME, data))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
