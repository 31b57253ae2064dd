r"""Per-layer variance summaries, the growth-law fit, plots and a Table-1-style comparison of one or many runs.

    python -m perijax.inspect DIR [DIR ...] [--steps=a,b,c] [--plots=OUT_DIR] [--json=OUT]

A DIR is a run's workdir (it has config.json or metrics.jsonl) or a sweep root (the runs its sweep.json lists, in
grid order, then any other workdir under it, e.g. an earlier grid's). Printed, in order:
  1. per quantity (residual variance, max |x|, float16 headroom = max |x| / 65504), a table layer by run at the chosen
     steps: by default each run's first and last step with per-layer stats; with --steps, for each requested step the
     last stats step at or before it (a run that ended early shows its last);
  2. per run and chosen step, the growth law of residual variance with depth (perijax/growth.py: linear, power or
     exponential, compared by AIC, else inconclusive), then per configuration the same across its seeds;
  3. Table 1: runs that differ only in `train.seed` are grouped; each column is mean ± sample std (ddof=1) over the
     seeds whose value is finite (`*` marks a column where some seed's value was not finite), with n_seeds and
     `diverged k/n`.

Diverged: the final logged training loss is not finite; or the run stopped before `train.steps` and logged a
non-finite loss; or the final training loss is above the first logged one.
The tasks' average uses each task's acc_norm where it reports one and acc otherwise (winogrande has only acc).
"""

import dataclasses
import glob
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np

from perijax import cli
from perijax import growth
from perijax import sweep
from perijax.errors import ArgumentError

LAYER_QUANTITIES = (('residual_var', 'residual variance'), ('max_abs', 'max |x|'),
                    ('fp16_headroom', 'float16 headroom (max |x| / 65504)'))
_MAX_TABLE_WIDTH = 120


@dataclasses.dataclass
class RunRecord:
  """What a workdir recorded: its config (nested dicts), metrics lines (one per step, sorted) and evals by step."""
  name: str
  workdir: str
  config: Dict[str, Any]
  metrics: List[Dict[str, Any]]
  evals: Dict[int, Dict[str, Any]]

  @property
  def planned_steps(self) -> Optional[int]:
    return self.config.get('train', {}).get('steps')


def _is_workdir(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in ('config.json', 'metrics.jsonl'))


def find_workdirs(paths: Sequence[str]) -> List[str]:
  """Expands sweep roots into their runs' workdirs; raises FileNotFoundError naming a path that is neither."""
  workdirs = []
  for path in paths:
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{path!r} is not a directory; expected a run workdir or a sweep root')
    if _is_workdir(path):
      workdirs.append(path)
      continue
    # A sweep root: its sweep.json's runs in grid order, then any other run under it (an earlier grid's).
    children = sorted(d for d in glob.glob(os.path.join(path, '*')) if os.path.isdir(d) and _is_workdir(d))
    listed = []
    if os.path.exists(os.path.join(path, 'sweep.json')):
      with open(os.path.join(path, 'sweep.json')) as f:
        listed = [os.path.join(path, run['name']) for run in json.load(f)['runs']]
    listed = [d for d in listed if d in children]
    if not listed and not children:
      raise FileNotFoundError(f'{path!r} has no config.json or metrics.jsonl and no run subdirectories; '
                              'expected a run workdir or a sweep root')
    workdirs.extend(listed + [d for d in children if d not in listed])
  return workdirs


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """metrics.jsonl as one line per step, sorted. A resumed run logs the steps after its checkpoint twice: the later
  line wins. A torn last line (a killed run) is skipped."""
  by_step = {}
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for number, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        line = json.loads(text)
      except json.JSONDecodeError:
        print(f'perijax.inspect: skipping unreadable line {number} of {path}', file=sys.stderr)
        continue
      if 'step' in line:
        by_step[int(line['step'])] = line
  return [by_step[s] for s in sorted(by_step)]


def load_run(workdir: str, name: Optional[str] = None) -> RunRecord:
  config = {}
  if os.path.exists(os.path.join(workdir, 'config.json')):
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  evals = {}
  for path in glob.glob(os.path.join(workdir, 'eval', 'step_*.json')):
    match = re.fullmatch(r'step_(\d+)\.json', os.path.basename(path))
    if match:
      with open(path) as f:
        evals[int(match.group(1))] = json.load(f)
  return RunRecord(name or os.path.basename(os.path.normpath(workdir)), workdir, config,
                   read_metrics(os.path.join(workdir, 'metrics.jsonl')), evals)


def load_runs(paths: Sequence[str]) -> List[RunRecord]:
  workdirs = find_workdirs(paths)
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  # Two sweep roots can hold runs of the same name: then say which root each came from.
  names = [f'{os.path.basename(os.path.dirname(os.path.normpath(w)))}/{n}' if names.count(n) > 1 else n
           for w, n in zip(workdirs, names)]
  return [load_run(w, n) for w, n in zip(workdirs, names)]


# ---- per-layer stats at chosen steps ---------------------------------------------------------------------------------

def stats_lines(run: RunRecord) -> List[Dict[str, Any]]:
  """Lines with per-layer stats; a run whose metrics have none falls back on its evals' `layers`."""
  lines = [line for line in run.metrics if line.get('residual_var')]
  if lines:
    return lines
  return [{'step': step, **run.evals[step]['layers']} for step in sorted(run.evals)
          if run.evals[step].get('layers', {}).get('residual_var')]


def chosen_stats(run: RunRecord, steps: Optional[Sequence[int]] = None) -> List[Optional[Dict[str, Any]]]:
  """The stats line for each requested step (the last one at or before it), or the first and last by default."""
  lines = stats_lines(run)
  if steps is None:
    return [lines[0], lines[-1]] if lines else [None, None]
  chosen = []
  for step in steps:
    before = [line for line in lines if line['step'] <= step]
    chosen.append(before[-1] if before else None)
  return chosen


def format_number(value: Any) -> str:
  """Fixed-point for ordinary magnitudes, scientific otherwise, so columns stay narrow and comparable."""
  if value is None:
    return '-'
  if isinstance(value, (bool, np.bool_)):
    return 'yes' if value else 'no'
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  value = float(value)
  if not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  if value == 0:
    return '0'
  if 1e-2 <= abs(value) < 1e4:
    return f'{value:.4g}'
  return f'{value:.2e}'


def format_table(headers: Sequence[Sequence[str]], rows: Sequence[Sequence[str]], keep: int = 1,
                 unit: int = 1) -> str:
  """Right-aligned fixed-width columns; header rows then body rows. A table wider than a terminal is cut into blocks
  of whole `unit`-column groups (e.g. one run's steps), each block repeating the first `keep` columns."""
  all_rows = [list(map(str, r)) for r in list(headers) + list(rows)]
  widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
  units = [list(range(i, min(i + unit, len(widths)))) for i in range(keep, len(widths), unit)]
  blocks, current = [], list(range(keep))
  for columns in units:
    width = sum(widths[i] + 2 for i in current + columns)
    if len(current) > keep and width > _MAX_TABLE_WIDTH:
      blocks.append(current)
      current = list(range(keep))
    current += columns
  blocks.append(current)
  text = []
  for block in blocks:
    for n, row in enumerate(all_rows):
      text.append('  '.join(row[i].rjust(widths[i]) if i >= keep else row[i].ljust(widths[i]) for i in block))
      if n == len(headers) - 1:
        text.append('-' * len(text[-1]))
    text.append('')
  return '\n'.join(text).rstrip('\n')


def _short_labels(runs: Sequence[RunRecord]) -> Tuple[List[str], str]:
  """Column labels: the run names if short, else #1, #2, ... with a legend."""
  if all(len(r.name) <= 16 for r in runs):
    return [r.name for r in runs], ''
  return [f'#{i}' for i in range(1, len(runs) + 1)], '\n'.join(f'  #{i} = {r.name}' for i, r in enumerate(runs, 1))


def layer_tables(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """Per quantity, a table of layers (rows) by run and step (columns)."""
  labels, legend = _short_labels(runs)
  chosen = [chosen_stats(run, steps) for run in runs]
  num_layers = max([len(line['residual_var']) for lines in chosen for line in lines if line] or [0])
  if not num_layers:
    return 'no per-layer stats in these runs (metrics lines every train.stats_every steps, or eval `layers`)'
  header_runs, header_steps = ['layer'], ['']
  for label, lines in zip(labels, chosen):
    for i, line in enumerate(lines):
      header_runs.append(label if i == 0 else '')
      header_steps.append(f'step {line["step"]}' if line else 'no stats')
  text = [legend] if legend else []
  for key, title in LAYER_QUANTITIES:
    rows = []
    for layer in range(num_layers):
      row = [str(layer + 1)]
      for lines in chosen:
        for line in lines:
          values = (line or {}).get(key) or []
          row.append(format_number(values[layer]) if layer < len(values) else '-')
      rows.append(row)
    text += [f'\n{title}', format_table([header_runs, header_steps], rows, unit=max(len(chosen[0]), 1))]
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
  losses = [float(line['loss']) for line in run.metrics if line.get('loss') is not None]
  last_step = run.metrics[-1]['step'] if run.metrics else 0
  planned = run.planned_steps
  stopped_early = planned is not None and last_step < planned
  final_loss = losses[-1] if losses else None
  diverged = bool(losses) and (not _finite(final_loss) or (stopped_early and not all(map(_finite, losses)))
                               or final_loss > losses[0])
  spikes = _last(run, 'spikes', sum(bool(line.get('spike')) for line in run.metrics))
  fp16_overflows = sum(sum(v for v in line.get('fp16_overflow') or [] if _finite(v)) for line in run.metrics)
  headroom = [v for line in run.metrics for v in line.get('fp16_headroom') or [] if v is not None]
  summary = {
      'name': run.name, 'workdir': run.workdir, 'last_step': last_step, 'planned_steps': planned,
      'finished': planned is not None and planned in run.evals,
      'initial_loss': losses[0] if losses else None, 'final_loss': final_loss, 'diverged': diverged,
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
      '\nGrowth of residual variance with depth: laws fitted in log space, ΔAIC to the best; a law wins by ΔAIC >= '
      f'{growth.MARGIN:g} (see perijax/growth.py)',
      growth_table(runs, steps), table1(rows)])
  data = {
      'runs': [{**summarize_run(run),
                # Every per-layer list of the chosen lines (attn_out_var, mlp_out_var, ... too), not just the tables'.
                'layer_stats': [line and {k: v for k, v in line.items() if k == 'step' or isinstance(v, list)}
                                for line in chosen_stats(run, steps)],
                'growth': growth_fits(run, steps)} for run in runs],
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
    raise ArgumentError('give at least one run workdir or sweep root: python -m perijax.inspect DIR [DIR ...]')
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
