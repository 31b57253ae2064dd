r"""The report on one or many runs (README.md, "Experiments, sweeps and inspection", says what each part shows).

    python -m perijax.report DIR [DIR ...] [--steps=a,b,c] [--plots=OUT_DIR] [--json=OUT]

A DIR is a run's workdir or a sweep root (perijax/runs.py).
"""

import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np

from perijax import cli
from perijax import growth
from perijax import instability
from perijax import stats
from perijax import sweep
from perijax import tables
from perijax.errors import ArgumentError
from perijax.runs import RunRecord, chosen_stats, load_runs
from perijax.tasks import lm_eval_results
from perijax.tables import format_number, format_table


def _variance(line: Dict[str, Any]) -> List[float]:
  return [math.nan if v is None else v for v in line['residual_var']]


def growth_fits(run: RunRecord, steps: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
  """The growth-law fits of residual variance against layer index at each chosen step (docs/paper.md, claim 1)."""
  return [{'step': line['step'], **growth.fit_growth(_variance(line)).to_dict()}
          for line in chosen_stats(run, steps) if line is not None]


def group_growth_fits(members: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
  """The fits across the seeds of one configuration (the law of the per-layer geometric mean, intervals over seeds),
  at each chosen step where every seed has stats with the same number of layers."""
  return [{'steps': [line['step'] for line in lines], **growth.fit_growth([_variance(l) for l in lines]).to_dict()}
          for lines in zip(*[chosen_stats(run, steps) for run in members])
          if all(lines) and len({len(line['residual_var']) for line in lines}) == 1]


def _growth_row(name: str, step: str, fit: Dict[str, Any]) -> List[str]:
  laws = fit['laws']
  if not laws:
    return [name, step, str(fit['num_layers']), f'- ({fit["note"]})'] + ['-'] * 7
  verdict = fit['verdict'] if fit['verdict'] != 'inconclusive' else f'inconclusive ({", ".join(fit["contenders"])})'
  lin, power, exp = ({k: format_number(v) for k, v in laws[law]['params'].items()} for law in growth.LAWS)
  return ([name, step, str(fit['num_layers']), verdict] + [f'{laws[law]["delta_aic"]:.1f}' for law in growth.LAWS]
          + [f'{lin["a"]} + {lin["b"]}·l', f'{power["a"]}·l^{power["p"]}', f'{exp["a"]}·e^({exp["r"]}·l)',
             format_number(fit['growth_ratio'])])


def growth_table(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """One row per run and chosen step, then one per configuration with several seeds (fitted together)."""
  headers = ['run', 'step', 'layers', 'verdict', 'ΔAIC lin', 'ΔAIC pow', 'ΔAIC exp', 'linear', 'power',
             'exponential', 'Var L/Var 1']
  rows = [_growth_row(run.name, str(fit['step']), fit) for run in runs for fit in growth_fits(run, steps)]
  rows += [_growth_row(f'{label} ({len(members)} seeds)', '/'.join(map(str, sorted(set(fit['steps'])))), fit)
           for label, members in group_runs(runs) if len(members) > 1 for fit in group_growth_fits(members, steps)]
  return format_table([headers], rows, keep=2)


def _last(run: RunRecord, key: str, default=None):
  values = [line[key] for line in run.metrics if line.get(key) is not None]
  return values[-1] if values else default


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
  return float(np.mean(values)) if values and None not in values else None


def summarize_run(run: RunRecord) -> Dict[str, Any]:
  """The numbers Table 1 compares, for one run. Each task keeps the metrics lm-eval reports for it; `avg` takes
  acc_norm for the tasks where lm-eval reports it and acc for the others (lm_eval_results.headline_metric)."""
  logged = [line for line in run.metrics if line.get('loss') is not None]
  losses = [float(line['loss']) for line in logged]
  divergence = instability.run_diverged(losses, [line['step'] for line in logged], run.config)
  headroom = [v for line in run.metrics for v in line.get('fp16_headroom') or [] if v is not None]
  summary = {
      'name': run.name, 'workdir': run.workdir, 'last_step': run.metrics[-1]['step'] if run.metrics else 0,
      'planned_steps': run.planned_steps, 'finished': run.planned_steps is not None and run.planned_steps in run.evals,
      'initial_loss': losses[0] if losses else None, 'final_loss': losses[-1] if losses else None,
      'diverged': divergence.diverged, 'diverged_at': divergence.step,
      'initial_scale_backoffs': _last(run, 'initial_scale_backoffs', 0),
      'spikes': _last(run, 'spikes', sum(bool(line.get('spike')) for line in run.metrics)),
      'fp16_overflows': sum(v for line in run.metrics for v in line.get('fp16_overflow') or []
                            if v is not None and math.isfinite(v)),
      'forward_overflows': _last(run, 'forward_overflows', 0), 'skipped_steps': _last(run, 'skipped_steps', 0),
      'max_fp16_headroom': stats.overflow_max(headroom),
      'eval_step': None, 'eval_loss': None, 'tasks': {}, 'avg_acc': None, 'avg': None,
  }
  if run.evals:
    step = max(run.evals)
    tasks = run.evals[step].get('tasks') or {}
    summary.update(
        eval_step=step, eval_loss=run.evals[step].get('loss'),
        tasks={name: {metric: t.get(metric) for metric in lm_eval_results.reported_metrics(name)}
               for name, t in tasks.items()},
        avg_acc=_mean_or_none([t.get('acc') for t in tasks.values()]),
        avg=_mean_or_none([t.get(lm_eval_results.headline_metric(name)) for name, t in tasks.items()]))
  return summary


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  """{'train': {'seed': 0}} -> {'train.seed': 0}."""
  return {flat_key: flat_value for key, value in tree.items()
          for flat_key, flat_value in (_flatten(value, f'{prefix}{key}.') if isinstance(value, dict)
                                       else {f'{prefix}{key}': value}).items()}


def _without_seed(name: str) -> str:
  return re.sub(r',?seed=\d+', '', name).strip(',')


def group_runs(runs: Sequence[RunRecord]) -> List[Tuple[str, List[RunRecord]]]:
  """Runs that differ only in `train.seed` form a group, labelled by the config fields that tell groups apart (runs
  without a config.json: by their name without its seed)."""
  groups = {}   # key -> (the config without its seed, or None; the members), in the order first seen
  for run in runs:
    config = {k: v for k, v in _flatten(run.config).items() if k != sweep.SEED_FIELD} if run.config else None
    key = _without_seed(run.name) if config is None else json.dumps(config, sort_keys=True, default=str)
    groups.setdefault(key, (config, []))[1].append(run)
  configs = [config for config, _ in groups.values()]
  differing = []
  if len(configs) > 1 and None not in configs:
    differing = [field for field in sorted(set().union(*configs))
                 if len({json.dumps(c.get(field), default=str) for c in configs}) > 1]
  names = sweep.short_names(differing)

  def label(key, config, members):
    if config is None:
      return key or 'run'
    if differing:
      return ','.join(f'{names[f]}={config.get(f)}' for f in differing)
    return _without_seed(members[0].name) or members[0].name

  return [(label(key, config, members), members) for key, (config, members) in groups.items()]


def mean_std(values: Sequence[Any]) -> Dict[str, Any]:
  """Mean and sample std (ddof=1) over the finite values; std is None with fewer than two. None means "not
  recorded" and is left out of `n`; NaN or inf (a diverged seed) counts in `n` but not in `n_finite`."""
  present = [float(v) for v in values if v is not None]
  finite = [v for v in present if math.isfinite(v)]
  return {'mean': float(np.mean(finite)) if finite else None,
          'std': float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
          'n': len(present), 'n_finite': len(finite)}


def aggregate(groups: Sequence[Tuple[str, List[RunRecord]]]) -> List[Dict[str, Any]]:
  """Table 1 rows: one per group, every column as mean_std over the group's seeds, `diverged` by
  perijax/instability.py's rule with each run's own parameters."""
  rows = []
  for label, members in groups:
    summaries = [summarize_run(run) for run in members]
    task_names = sorted({t for s in summaries for t in s['tasks']})
    columns = {key: mean_std([s[key] for s in summaries]) for key in
               ('final_loss', 'eval_loss', 'avg_acc', 'avg', 'spikes', 'fp16_overflows', 'forward_overflows',
                'skipped_steps')}
    columns.update({f'{task}/{metric}': mean_std([s['tasks'].get(task, {}).get(metric) for s in summaries])
                    for task in task_names for metric in lm_eval_results.reported_metrics(task)})
    rows.append({'group': label, 'runs': [s['name'] for s in summaries], 'n_seeds': len(members),
                 'diverged': sum(s['diverged'] for s in summaries), 'finished': sum(s['finished'] for s in summaries),
                 'columns': columns, 'task_names': task_names})
  return rows


def format_mean_std(cell: Dict[str, Any]) -> str:
  """'mean ± std', '*' when some seed's value was not finite; '-' when none was recorded."""
  if cell['n'] == 0:
    return '-'
  if cell['mean'] is None:
    return 'nan'
  text = format_number(cell['mean'])
  if cell['std'] is not None:
    # A spread at float rounding level is no spread: print 0, not 6.8e-17.
    std = cell['std'] if cell['std'] > 1e-12 * max(abs(cell['mean']), 1e-300) else 0
    text += f' ± {format_number(std)}'
  return text + ('*' if cell['n_finite'] < cell['n'] else '')


def table1(rows: Sequence[Dict[str, Any]]) -> str:
  """The quality columns and the stability columns of Table 1, as two tables so each fits a terminal."""
  task_names = sorted({t for row in rows for t in row['task_names']})
  quality = (['final_loss', 'eval_loss'] + [f'{t}/{m}' for t in task_names for m in lm_eval_results.reported_metrics(t)]
             + ['avg'])
  # A metric no run recorded (an eval file without acc_norm) would only be a column of dashes.
  quality = [k for k in quality if any(row['columns'].get(k, {}).get('n') for row in rows) or k == 'final_loss']
  stability = ['spikes', 'fp16_overflows', 'forward_overflows', 'skipped_steps']
  text = []
  for title, keys, counts in (('quality', quality, []), ('stability', stability, ['diverged', 'finished'])):
    body = [[row['group'], str(row['n_seeds'])]
            + [format_mean_std(row['columns'][k]) if k in row['columns'] else '-' for k in keys]
            + [f'{row[k]}/{row["n_seeds"]}' for k in counts] for row in rows]
    headers = ['config', 'n_seeds'] + keys + counts
    text += [f'\nTable 1 ({title}): mean ± std over seeds', format_table([headers], body)]
  if any(c['n_finite'] < c['n'] for row in rows for c in row['columns'].values()):
    text.append('* over the seeds whose value is finite (a diverged seed has none)')
  return '\n'.join(text)


def report(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> Tuple[str, Dict[str, Any]]:
  """The whole terminal report and its machine-readable twin."""
  groups = group_runs(runs)
  rows = aggregate(groups)
  text = '\n'.join([
      'Per-layer statistics of the residual stream', tables.layer_tables(runs, steps),
      "\nNorm scales γ by layer: mean [min, max]", tables.scale_tables(runs, steps) or 'no norm scales logged',
      '\nGrowth of residual variance with depth: laws fitted in log space, ΔAIC to the best; a law wins by ΔAIC >= '
      f'{growth.MARGIN:g} (see perijax/growth.py)',
      growth_table(runs, steps),
      '\nWhat drives the growth, per sub-layer: Var(x + Δ) - Var(x) = Var(Δ) + 2·Cov(x, Δ), Δ = the sub-layer\'s '
      'net change of the stream (perijax/stats.py)', tables.increment_table(runs, steps),
      '\nMassive activations (Sun et al. 2024): the largest |x| per layer, its ratio to the median |x|, where it sits',
      *[tables.massive_table(run, steps) for run in runs if tables.massive_line(run, steps)],
      tables.massive_placements(runs, steps), table1(rows)])
  data = {
      'runs': [{**summarize_run(run),
                # Every per-layer list of the chosen lines (attn_out_var, mlp_out_var, ... too), not just the tables'.
                'layer_stats': [line and {k: v for k, v in line.items() if k == 'step' or isinstance(v, list)}
                                for line in chosen_stats(run, steps)],
                'growth': growth_fits(run, steps), 'massive': tables.massive_summary(run, steps)}
               for run in runs],
      'growth_groups': [{'group': label, 'runs': [run.name for run in members],
                         'fits': group_growth_fits(members, steps)}
                        for label, members in groups if len(members) > 1],
      'table1': rows,
  }
  return text, data


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_list('steps', None, 'Steps for the per-layer tables (default: first and last with stats).')
  flags.DEFINE_string('plots', None, 'Directory to write PNG plots into.')
  flags.DEFINE_string('json', None, 'File to write every number as JSON.')


def main(argv):
  if len(argv) < 2:
    raise ArgumentError('give at least one run workdir or sweep root: python -m perijax.report DIR [DIR ...]')
  try:
    steps = [int(s) for s in FLAGS.steps] if FLAGS.steps else None
  except ValueError:
    raise ArgumentError(f'--steps={",".join(FLAGS.steps)}: expected integers, e.g. --steps=0,100,200') from None
  try:
    runs = load_runs(argv[1:])
  except FileNotFoundError as e:
    raise ArgumentError(str(e)) from None
  text, data = report(runs, steps)
  print(text)
  if FLAGS.plots:
    from perijax import plots  # pylint: disable=g-import-not-at-top  (matplotlib only when plots are asked for)
    data['plots'] = plots.write_plots(runs, FLAGS.plots)
    print('\nplots: ' + ', '.join(data['plots']))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(data, f, indent=1)
    print(f'json: {FLAGS.json}')


if __name__ == '__main__':
  define_flags()
  cli.run(main, takes_arguments=True)
