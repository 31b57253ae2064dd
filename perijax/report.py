r"""Per-layer variance summaries, the growth-law fit, plots and a Table-1-style comparison of one or many runs.

    python -m perijax.report DIR [DIR ...] [--steps=a,b,c] [--plots=OUT_DIR] [--json=OUT]

A DIR is a run's workdir (it has config.json or metrics.jsonl) or a sweep root (the runs its sweep.json lists, in
grid order, then any other workdir under it, e.g. an earlier grid's). Printed, in order:
  1. per quantity (residual variance, max |x|, float16 headroom = max |x| / 65504), a table layer by run at the chosen
     steps: by default each run's first and last step with per-layer stats; with --steps, for each requested step the
     last stats step at or before it (a run that ended early shows its last); then per run the norms' scales γ
     by layer and kind of norm at the last chosen step (mean [min, max]), where the run logged them;
  2. per run and chosen step, the growth law of residual variance with depth (perijax/growth.py: linear, power or
     exponential, compared by AIC, else inconclusive), then per configuration the same across its seeds;
  3. what drives the growth: per sub-layer and layer, Var(x + Δ) - Var(x), Var(Δ) and 2·Cov(x, Δ)
     (perijax/tables.py);
  4. massive activations (Sun et al. 2024): per run at its last chosen step, each layer's largest |x| in the residual
     stream and in each sub-layer's output, its ratio to the median |x| and where it sits (position in the document /
     channel, token), `*` where massive by the run's train.massive_abs_threshold and massive_ratio_threshold; then one
     row per run comparing placements: the layers with massive activations, their channels, the share at the first
     token and at delimiters (document boundary, whitespace, punctuation), the largest ratio;
  5. Table 1: runs that differ only in `train.seed` are grouped; each column is mean ± sample std (ddof=1) over the
     seeds whose value is finite (`*` marks a column where some seed's value was not finite), with n_seeds and
     `diverged k/n`.

Diverged: perijax/instability.py's rule on the logged training losses (a non-finite loss, or a smoothed loss above
its running minimum by train.divergence_margin for train.divergence_steps steps), with the run's own parameters.
The tasks' average uses each task's acc_norm where it reports one and acc otherwise (winogrande has only acc).
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
from perijax import sweep
from perijax import tables
from perijax.errors import ArgumentError
# Re-exported: the names experiments and tests use as perijax.report's.
from perijax.runs import RunRecord, chosen_stats, find_workdirs, load_run, load_runs  # noqa
from perijax.tables import format_number, format_table, layer_tables  # noqa


SCALE_KINDS = (('in_norm', 'input norms'), ('out_norm', 'output norms'), ('qk_norm', 'QK norms'),
               ('final_norm', 'final norm'), ('embed_norm', 'embedding norm'))


def scale_tables(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """Per run, the norms' γ (perijax.stats.scale_summary) at the last chosen step: layers (rows) by kind of norm,
  each cell mean [min, max]; the final and embedding norms in rows of their own."""
  text = []
  for run in runs:
    line = chosen_stats(run, steps)[-1] or {}
    if not any(key.endswith('_scale_mean') for key in line) and run.evals:  # evaluation alone logged them
      evaluated = run.evals.get(line.get('step')) or run.evals[max(run.evals)]
      line = {'step': evaluated['step'], **evaluated.get('norm_scales', {})}

    def cell(kind, layer=None):
      values = [line[f'{kind}_scale_{name}'] for name in ('mean', 'min', 'max')]
      values = values if layer is None else [value[layer] for value in values]
      return '-' if values[0] is None else '{} [{}, {}]'.format(*map(format_number, values))

    per_layer = [(kind, title) for kind, title in SCALE_KINDS if isinstance(line.get(f'{kind}_scale_mean'), list)]
    whole = [(kind, title) for kind, title in SCALE_KINDS if isinstance(line.get(f'{kind}_scale_mean'), float)]
    if not per_layer and not whole:
      continue
    depth = len(line[f'{per_layer[0][0]}_scale_mean']) if per_layer else 0
    rows = [[str(layer + 1)] + [cell(kind, layer) for kind, _ in per_layer] for layer in range(depth)]
    rows += [[title, cell(kind)] + [''] * (len(per_layer) - 1) for kind, title in whole]
    headers = ['layer'] + ([title for _, title in per_layer] or ['γ'])
    text += [f'\n{run.name} (step {line["step"]})', format_table([headers], rows)]
  return '\n'.join(text)


def growth_fits(run: RunRecord, steps: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
  """The growth-law fits of residual variance against layer index at each chosen step (docs/paper.md, claim 1)."""
  fits = []
  for line in chosen_stats(run, steps):
    if line is not None:
      variance = [math.nan if v is None else v for v in line['residual_var']]
      fits.append({'step': line['step'], **growth.fit_growth(variance).to_dict()})
  return fits


def group_growth_fits(members: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
  """The same fits across the seeds of one configuration ([seeds, layers]: the law of the per-layer geometric mean,
  intervals over seeds), at each chosen step where every seed has stats with the same number of layers."""
  fits = []
  for lines in zip(*[chosen_stats(run, steps) for run in members]):
    if all(line is not None for line in lines) and len({len(line['residual_var']) for line in lines}) == 1:
      variance = [[math.nan if v is None else v for v in line['residual_var']] for line in lines]
      fits.append({'steps': [line['step'] for line in lines], **growth.fit_growth(variance).to_dict()})
  return fits


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
  for label, members in group_runs(runs):
    if len(members) > 1:
      rows += [_growth_row(f'{label} ({len(members)} seeds)', '/'.join(map(str, sorted(set(fit['steps'])))), fit)
               for fit in group_growth_fits(members, steps)]
  return format_table([headers], rows, keep=2)


# ---- per-run summary and Table 1 ---------------------------------------------------------------------------------

def _last(run: RunRecord, key: str, default=None):
  values = [line[key] for line in run.metrics if line.get(key) is not None]
  return values[-1] if values else default


def _finite(value) -> bool:
  return value is not None and math.isfinite(float(value))


def summarize_run(run: RunRecord) -> Dict[str, Any]:
  """The numbers Table 1 compares, for one run; the divergence rule is in the module docstring."""
  logged = [line for line in run.metrics if line.get('loss') is not None]
  losses = [float(line['loss']) for line in logged]
  last_step = run.metrics[-1]['step'] if run.metrics else 0
  planned = run.planned_steps
  final_loss = losses[-1] if losses else None
  divergence = instability.run_diverged(losses, [line['step'] for line in logged], run.config)
  spikes = _last(run, 'spikes', sum(bool(line.get('spike')) for line in run.metrics))
  fp16_overflows = sum(sum(v for v in line.get('fp16_overflow') or [] if _finite(v)) for line in run.metrics)
  headroom = [v for line in run.metrics for v in line.get('fp16_headroom') or [] if v is not None]
  summary = {
      'name': run.name, 'workdir': run.workdir, 'last_step': last_step, 'planned_steps': planned,
      'finished': planned is not None and planned in run.evals,
      'initial_loss': losses[0] if losses else None, 'final_loss': final_loss, 'diverged': divergence.diverged,
      'diverged_at': divergence.step, 'initial_scale_backoffs': _last(run, 'initial_scale_backoffs', 0),
      'spikes': spikes, 'fp16_overflows': fp16_overflows, 'forward_overflows': _last(run, 'forward_overflows', 0),
      'skipped_steps': _last(run, 'skipped_steps', 0), 'max_fp16_headroom': max(headroom) if headroom else None,
      'eval_step': None, 'eval_loss': None, 'tasks': {}, 'avg_acc': None, 'avg': None,
  }
  if run.evals:
    step = max(run.evals)
    final_eval = run.evals[step]
    tasks = final_eval.get('tasks') or {}
    preferred = [t.get('acc_norm') if t.get('acc_norm') is not None else t.get('acc') for t in tasks.values()]
    accs = [t.get('acc') for t in tasks.values()]
    summary.update(
        eval_step=step, eval_loss=final_eval.get('loss'),
        tasks={name: {'acc': t.get('acc'), 'acc_norm': t.get('acc_norm')} for name, t in tasks.items()},
        avg_acc=float(np.mean(accs)) if accs and None not in accs else None,
        avg=float(np.mean(preferred)) if preferred and None not in preferred else None)
  return summary


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def group_runs(runs: Sequence[RunRecord]) -> List[Tuple[str, List[RunRecord]]]:
  """Runs that differ only in `train.seed` form a group, labelled by the config fields that tell groups apart."""
  keys, groups = [], {}
  for run in runs:
    if run.config:
      config = {k: v for k, v in _flatten(run.config).items() if k != sweep.SEED_FIELD}
      key = json.dumps(config, sort_keys=True, default=str)
    else:   # no config.json: fall back on the run name without its seed
      key = re.sub(r',?seed=\d+', '', run.name)
      config = None
    if key not in groups:
      keys.append(key)
      groups[key] = (config, [])
    groups[key][1].append(run)
  configs = [groups[k][0] for k in keys]
  differing = []
  if len(keys) > 1 and all(c is not None for c in configs):
    fields = sorted(set().union(*configs))
    differing = [f for f in fields if len({json.dumps(c.get(f), default=str) for c in configs}) > 1]
  names = sweep.short_names(differing)
  labelled = []
  for key in keys:
    config, members = groups[key]
    if config is not None and differing:
      label = ','.join(f'{names[f]}={config.get(f)}' for f in differing)
    elif config is None:
      label = key or 'run'
    else:
      label = re.sub(r',?seed=\d+', '', members[0].name).strip(',') or members[0].name
    labelled.append((label, members))
  return labelled


def mean_std(values: Sequence[Any]) -> Dict[str, Any]:
  """Mean and sample std (ddof=1) over the finite values; std is None with fewer than two. None means "not
  recorded" and is left out of `n`; NaN or inf (a diverged seed) counts in `n` but not in `n_finite`."""
  present = [float(v) for v in values if v is not None]
  finite = [v for v in present if math.isfinite(v)]
  return {'mean': float(np.mean(finite)) if finite else None,
          'std': float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
          'n': len(present), 'n_finite': len(finite)}


def aggregate(groups: Sequence[Tuple[str, List[RunRecord]]]) -> List[Dict[str, Any]]:
  """Table 1 rows: one per group, every column as mean_std over the group's seeds."""
  rows = []
  for label, members in groups:
    summaries = [summarize_run(run) for run in members]
    task_names = sorted({t for s in summaries for t in s['tasks']})
    columns = {key: mean_std([s[key] for s in summaries]) for key in
               ('final_loss', 'eval_loss', 'avg_acc', 'avg', 'spikes', 'fp16_overflows', 'forward_overflows',
                'skipped_steps')}
    for task in task_names:
      for metric in ('acc', 'acc_norm'):
        columns[f'{task}/{metric}'] = mean_std([s['tasks'].get(task, {}).get(metric) for s in summaries])
    rows.append({'group': label, 'runs': [s['name'] for s in summaries], 'n_seeds': len(members),
                 'diverged': sum(s['diverged'] for s in summaries), 'finished': sum(s['finished'] for s in summaries),
                 'columns': columns, 'task_names': task_names})
  return rows


def format_mean_std(cell: Dict[str, Any]) -> str:
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
  quality = ['final_loss', 'eval_loss'] + [f'{t}/{m}' for t in task_names for m in ('acc', 'acc_norm')] + ['avg']
  # A metric no run reports (winogrande's acc_norm) would only be a column of dashes.
  quality = [k for k in quality if any(row['columns'].get(k, {}).get('n') for row in rows) or k == 'final_loss']
  stability = ['spikes', 'fp16_overflows', 'forward_overflows', 'skipped_steps']
  text = []
  for title, keys, extra in (('quality', quality, []), ('stability', stability, ['diverged', 'finished'])):
    headers = ['config', 'n_seeds'] + keys + extra
    body = []
    for row in rows:
      cells = [format_mean_std(row['columns'][k]) if k in row['columns'] else '-' for k in keys]
      counts = [f'{row[k]}/{row["n_seeds"]}' for k in extra]
      body.append([row['group'], str(row['n_seeds'])] + cells + counts)
    text += [f'\nTable 1 ({title}): mean ± std over seeds', format_table([headers], body)]
  if any(c['n_finite'] < c['n'] for row in rows for c in row['columns'].values()):
    text.append('* over the seeds whose value is finite (a diverged seed has none)')
  return '\n'.join(text)


def report(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> Tuple[str, Dict[str, Any]]:
  """The whole terminal report and its machine-readable twin."""
  rows = aggregate(group_runs(runs))
  text = '\n'.join([
      'Per-layer statistics of the residual stream', layer_tables(runs, steps),
      "\nNorm scales γ by layer: mean [min, max]", scale_tables(runs, steps) or 'no norm scales logged',
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
                        for label, members in group_runs(runs) if len(members) > 1],
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
  cli.run(main)
