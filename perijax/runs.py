"""Reading runs: a workdir's config, metrics lines and evals (`load_runs`), and its per-layer statistics lines at chosen
steps (`chosen_stats`): what `python -m perijax.report` and the experiments read."""

import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from etils import epath

from perijax import rundir


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

  @property
  def placement(self) -> Optional[str]:
    return self.config.get('model', {}).get('norm', {}).get('placement')


def find_workdirs(paths: Sequence[str]) -> List[str]:
  """Expands each sweep root into its runs' workdirs: those its sweep.json lists, in grid order, then any other run
  under it (an earlier grid's). Raises FileNotFoundError naming a path that is neither. gs:// paths work too."""
  workdirs = []
  for path in paths:
    if not epath.Path(path).is_dir():
      raise FileNotFoundError(f'{path!r} is not a directory; expected a run workdir or a sweep root')
    if rundir.is_run(path):
      workdirs.append(path)
      continue
    children = sorted(os.path.join(path, d.name) for d in epath.Path(path).iterdir()
                      if not d.name.startswith('.') and d.is_dir() and rundir.is_run(d))
    if not children:
      raise FileNotFoundError(f'{path!r} has no config.json or metrics.jsonl and no run subdirectories; '
                              'expected a run workdir or a sweep root')
    sweep_json = epath.Path(path) / 'sweep.json'
    listed = json.loads(sweep_json.read_text())['runs'] if sweep_json.exists() else []
    order = {os.path.join(path, run['name']): index for index, run in enumerate(listed)}
    workdirs.extend(sorted(children, key=lambda child: order.get(child, len(order))))  # stable: the rest by name
  return workdirs


def read_metrics(workdir: str) -> List[Dict[str, Any]]:
  """The run's metrics lines, one per step, sorted. A resumed run logs the steps after its checkpoint twice: the later
  line wins. A torn last line (a killed run) is skipped."""
  by_step = {}
  for path in rundir.metrics_files(workdir):
    for number, text in enumerate(path.read_text().splitlines(), 1):
      try:
        line = json.loads(text) if text.strip() else {}
      except json.JSONDecodeError:
        print(f'perijax.runs: skipping unreadable line {number} of {path}', file=sys.stderr)
        continue
      if 'step' in line:
        by_step[int(line['step'])] = line
  return [by_step[s] for s in sorted(by_step)]


def load_run(workdir: str, name: Optional[str] = None) -> RunRecord:
  config_file = rundir.config_file(workdir)
  config = json.loads(config_file.read_text()) if config_file.exists() else {}
  evals = {step: json.loads(path.read_text()) for step, path in rundir.eval_results(workdir).items()}
  return RunRecord(name or os.path.basename(os.path.normpath(workdir)), workdir, config, read_metrics(workdir), evals)


def load_runs(paths: Sequence[str]) -> List[RunRecord]:
  workdirs = find_workdirs(paths)
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  # Two sweep roots can hold runs of the same name: then say which root each came from.
  names = [f'{os.path.basename(os.path.dirname(os.path.normpath(w)))}/{n}' if names.count(n) > 1 else n
           for w, n in zip(workdirs, names)]
  return [load_run(w, n) for w, n in zip(workdirs, names)]


def chosen_stats(run: RunRecord, steps: Optional[Sequence[int]] = None) -> List[Optional[Dict[str, Any]]]:
  """The per-layer stats line for each requested step (the last one at or before it), or the first and last by
  default. A run whose metrics have no stats falls back on its evals' `layers`."""
  lines = [line for line in run.metrics if line.get('residual_var')] or [
      {'step': step, **run.evals[step]['layers']} for step in sorted(run.evals)
      if run.evals[step].get('layers', {}).get('residual_var')]
  if steps is None:
    return [lines[0], lines[-1]] if lines else [None, None]
  return [next((line for line in reversed(lines) if line['step'] <= step), None) for step in steps]
