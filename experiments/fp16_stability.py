r"""docs/paper.md claims 2 and 3: in float16, Pre-LN's hidden states approach and pass 65504 and its training spikes and
diverges more often as the learning rate and depth rise; Peri-LN stays far inside float16 and trains smoothly.

    python -m experiments.fp16_stability                # small scale: 4 lrs × 2 depths × pre/peri × 3 seeds, ~30 min
    python -m experiments.fp16_stability --config=configs/paper_400m.py --print          # paper scale, for a scheduler

Grid: placement in --placements × optimizer.lr in --lrs × model.num_layers in --depths × --seeds. By default, at
small scale, lr 3e-3 to 1e-1 (the high end of experiments.lr_sensitivity's grid, where instabilities appear) and 2 and
16 layers (a deep model); at paper scale the config's lr and 10× it, at half and all of its depth. Every run computes
in float16 with float32 master weights and dynamic loss scaling (mixed precision), unless the config says otherwise.
Per group (mean ± std over seeds): final loss; float16 overflows (elements past 65504 or non-finite in the per-layer
statistics, summed over statistics steps); forward overflows (steps whose loss was not finite); initial back-offs
(non-finite gradients while the loss scale searches down from train.initial_loss_scale, before the first finite step:
not an instability) apart from skipped steps (non-finite gradients once the scale has settled); gradient-norm spikes (a
step whose global gradient norm exceeds train.spike_factor × the median of the last train.spike_window steps); diverged
seeds by perijax/instability.py's rule (a non-finite loss, or a smoothed loss held above its running minimum); and the
largest float16 headroom (max |x| / 65504; a NaN, from an overflow, counts as inf) seen at any statistics step. Pre
against Peri at each point: mean ± std and whether the difference exceeds the seed spread (experiments.common.compare).

Small scale on CPU: `model.softmax_in_float32=False`, because XLA:CPU cannot run jax.nn.dot_product_attention with
float16 inputs and a float32 softmax ("precision F16_F16_F32 is not supported by dot_general on CPU"); the attention
softmax then runs in float16 too, which makes float16 a harsher test, for both placements alike.
Writes results/fp16_stability.json and results/fp16_stability.png.
"""

import os
import time

from absl import flags
import numpy as np

from experiments import common
from perijax import cli
from perijax import plots
from perijax import report as report_lib
from perijax import stats
from perijax import tables

NAME = 'fp16_stability'
SMALL = {'model.num_layers': 2, 'model.d_model': 64, 'model.compute_dtype': 'float16',
         'model.softmax_in_float32': False, 'train.steps': 200, 'train.batch_size': 8, 'train.seq_len': 64,
         'train.log_every': 5, 'train.stats_every': 20, 'train.spike_window': 20, 'train.divergence_steps': 30,
         'optimizer.warmup_steps': 10, 'checkpoint.every': 0}
SMALL_LRS, SMALL_DEPTHS = [3e-3, 1e-2, 3e-2, 1e-1], [2, 16]
PAPER = {'model.compute_dtype': 'float16', 'train.steps': 5000, 'train.stats_every': 250,
         'optimizer.warmup_steps': 500, 'checkpoint.every': 1000}
GROUP_FIELDS = ('model.norm.placement', 'optimizer.lr', 'model.num_layers')
COLUMNS = ('final_loss', 'fp16_overflows', 'forward_overflows', 'initial_scale_backoffs', 'skipped_steps', 'spikes',
           'max_fp16_headroom')
FLAGS = flags.FLAGS


def grid_from(setup, placements, lrs, depths):
  config = setup.resolved()
  lrs = [float(v) for v in lrs] or (SMALL_LRS if setup.small_scale else [config.optimizer.lr, 10 * config.optimizer.lr])
  depths = [int(v) for v in depths] or (SMALL_DEPTHS if setup.small_scale else
                                        [config.model.num_layers // 2, config.model.num_layers])
  return [('model.norm.placement', list(placements)), ('optimizer.lr', lrs), ('model.num_layers', depths)]


def summarize(runs, records):
  """One row per (placement, lr, depth): every column as mean ± std over seeds, and the diverged count (by
  perijax/instability.py's rule, which perijax.report.summarize_run applies)."""
  rows = []
  for key, members in common.by_group(runs, records, GROUP_FIELDS).items():
    summaries = [report_lib.summarize_run(record) for record in members]
    row = dict(zip(('placement', 'lr', 'num_layers'), key))
    row['per_seed'] = {column: [s[column] for s in summaries] for column in COLUMNS}
    row.update({column: report_lib.mean_std([s[column] for s in summaries]) for column in COLUMNS})
    row['worst_fp16_headroom'] = stats.overflow_max([s['max_fp16_headroom'] for s in summaries
                                                     if s['max_fp16_headroom'] is not None])
    row['diverged'] = sum(s['diverged'] for s in summaries)
    row['diverged_at'] = [s['diverged_at'] for s in summaries]
    row['n_seeds'] = len(summaries)
    row['final_loss_scale'] = [next((line['loss_scale'] for line in reversed(record.metrics) if 'loss_scale' in line),
                                    None) for record in members]
    rows.append(row)
  return rows


def checks(rows):
  """Pre against Peri at each (lr, depth): is Pre-LN the less stable one, as the paper says?"""
  pairs = {}
  for row in rows:
    pairs.setdefault((row['lr'], row['num_layers']), {})[row['placement']] = row
  out = {'per_point': []}
  for (lr, depth), pair in pairs.items():
    if 'pre' not in pair or 'peri' not in pair:
      continue
    pre, peri = pair['pre'], pair['peri']
    total = lambda row, column: (row[column]['mean'] or 0) * row[column]['n_finite']
    out['per_point'].append({
        'lr': lr, 'num_layers': depth,
        'headroom_pre_over_peri': (pre['worst_fp16_headroom'] / peri['worst_fp16_headroom']
                                   if pre['worst_fp16_headroom'] and peri['worst_fp16_headroom'] else None),
        'overflows_pre_peri': [total(pre, 'fp16_overflows'), total(peri, 'fp16_overflows')],
        'skipped_pre_peri': [total(pre, 'skipped_steps'), total(peri, 'skipped_steps')],
        'spikes_pre_peri': [total(pre, 'spikes'), total(peri, 'spikes')],
        'diverged_pre_peri': [pre['diverged'], peri['diverged']],
        'pre_vs_peri': {column: common.compare(pre['per_seed'][column], peri['per_seed'][column])
                        for column in ('final_loss', 'max_fp16_headroom', 'skipped_steps', 'spikes')},
    })
  points = out['per_point']
  if points:
    out['pre_headroom_larger_everywhere'] = all((p['headroom_pre_over_peri'] or 0) > 1 for p in points)
    out['any_fp16_overflow'] = {'pre': sum(p['overflows_pre_peri'][0] for p in points),
                                'peri': sum(p['overflows_pre_peri'][1] for p in points)}
    out['initial_scale_backoffs'] = {p: sum(row['initial_scale_backoffs']['mean'] or 0 for row in rows
                                            if row['placement'] == p) for p in ('pre', 'peri')}
    out['skipped_steps'] = {'pre': sum(p['skipped_pre_peri'][0] for p in points),
                            'peri': sum(p['skipped_pre_peri'][1] for p in points)}
    out['spikes'] = {'pre': sum(p['spikes_pre_peri'][0] for p in points),
                     'peri': sum(p['spikes_pre_peri'][1] for p in points)}
    out['diverged'] = {'pre': sum(p['diverged_pre_peri'][0] for p in points),
                       'peri': sum(p['diverged_pre_peri'][1] for p in points)}
  return out


def table(rows):
  headers = ['placement', 'lr', 'layers', 'seeds'] + list(COLUMNS) + ['worst headroom', 'diverged']
  body = [[row['placement'], f'{row["lr"]:g}', str(row['num_layers']), str(row['n_seeds'])] +
          [report_lib.format_mean_std(row[c]) for c in COLUMNS] +
          [tables.format_number(row['worst_fp16_headroom']), f'{row["diverged"]}/{row["n_seeds"]}']
          for row in rows]
  return tables.format_table([headers], body)


def plot(runs, records, rows, path):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (headroom_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.2), layout='constrained')
  points = sorted({(row['lr'], row['num_layers']) for row in rows})
  placements = list(dict.fromkeys(row['placement'] for row in rows))
  width = 0.8 / max(len(placements), 1)
  finite = [r['worst_fp16_headroom'] for r in rows if r['worst_fp16_headroom'] not in (None, float('inf'))]
  overflow_bar = max(finite + [1.0]) * 4
  for i, placement in enumerate(placements):
    values = np.array([next((r['worst_fp16_headroom'] for r in rows if r['placement'] == placement and
                             (r['lr'], r['num_layers']) == point), None) or np.nan for point in points])
    # An overflowed run's headroom is infinite, which a log axis cannot draw: a hatched bar to the top, marked inf.
    overflowed = np.isinf(values)
    x = np.arange(len(points)) + i * width
    headroom_ax.bar(x, np.where(overflowed, overflow_bar, values), width, label=placement,
                    color=plots.placement_color(placement), hatch=[('//' if o else '') for o in overflowed])
    for position in x[overflowed]:
      headroom_ax.text(position, overflow_bar, 'inf', ha='center', va='bottom', fontsize=7)
  headroom_ax.axhline(1.0, color='k', linestyle=':', label='float16 max (65504)')
  headroom_ax.set_xticks(np.arange(len(points)) + width * (len(placements) - 1) / 2,
                         [f'lr {lr:g}\n{depth} layers' for lr, depth in points], fontsize=7)
  headroom_ax.set(yscale='log', ylabel='max |x| / 65504 (worst seed)', title='float16 headroom')
  headroom_ax.legend(fontsize=7)
  for run, record in zip(runs, records):
    if run.overrides['train.seed'] != 0:
      continue
    steps = [line['step'] for line in record.metrics if line.get('loss') is not None]
    losses = [line['loss'] for line in record.metrics if line.get('loss') is not None]
    style = '-' if run.overrides['model.norm.placement'] == 'peri' else '--'
    loss_ax.plot(steps, losses, style, label=run.name.replace(',seed=0', ''), linewidth=1,
                 color=plots.placement_color(run.overrides['model.norm.placement']))
  loss_ax.set(xlabel='step', ylabel='training loss', title='loss (seed 0; dashed = not peri)')
  loss_ax.legend(fontsize=6)
  return plots.save_figure(fig, path)


def define_flags():
  common.define_flags(NAME, seeds=3)
  flags.DEFINE_list('placements', ['pre', 'peri'], 'Placements to compare.')
  common.define_number_list('lrs', [], 'Peak learning rates (default: small scale 3e-3..1e-1; else the config lr and '
                            '10x).')
  common.define_number_list('depths', [], 'Layer counts (default: small scale 2 and 16; else half and all of the '
                            'config\'s).', kind=int)


def main(argv):
  del argv
  start = time.time()
  setup = common.setup_from_flags(SMALL, PAPER)
  grid = grid_from(setup, FLAGS.placements, FLAGS.lrs, FLAGS.depths)
  runs = common.plan(setup, grid, FLAGS.seeds, FLAGS.root)
  if not common.execute(setup, runs, FLAGS.root):
    return
  records = common.load_records(runs)
  rows = summarize(runs, records)
  data = {'settings': {**common.settings(setup, grid, FLAGS.seeds, FLAGS.root),
                       'wall_seconds': round(time.time() - start)},
          'groups': rows, 'checks': checks(rows),
          'runs': [{'run': run.name, **report_lib.summarize_run(record)} for run, record in zip(runs, records)]}
  plot(runs, records, rows, os.path.join(FLAGS.results, f'{NAME}.png'))
  print(table(rows))
  for point in data['checks'].get('per_point', []):
    for column, comparison in point['pre_vs_peri'].items():
      print(f'lr {point["lr"]:g}, {point["num_layers"]} layers, {column}: '
            f'{common.compare_text("pre", "peri", comparison)}')
  print(f'checks: { {k: v for k, v in data["checks"].items() if k != "per_point"} }')
  print('wrote', common.write_json(FLAGS.results, NAME, data))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
