r"""The README's demo: tiny Pre-LN, Peri-LN and Post-LN models, each trained, then evaluated by the separate
evaluation script, compared side by side (`bash experiments/demo.sh` sets up .venv and the corpus, then runs it).

    python -m perijax.demo --root=runs/demo [--config=configs/tiny.py] [--placements=pre,peri,post] [--config.a.b=v]

One `perijax.sweep` grid over `model.norm.placement` (ROOT/placement=<name>,seed=0/): a run already evaluated is
skipped, so after an interruption the same command picks up where it stopped. Then the `perijax.report` report is
printed and written with its plots: ROOT/report.txt, ROOT/report.json, ROOT/plots/*.png.
"""

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from absl import flags
import ml_collections

from perijax import cli
from perijax import config as config_lib
from perijax import report as report_lib
from perijax import rundir
from perijax import runs as runs_lib
from perijax import sweep
from perijax.errors import ArgumentError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'tiny.py')
PLACEMENTS = ('pre', 'peri', 'post')


def plan_runs(config: ml_collections.ConfigDict, placements: Sequence[str], root: str,
              fixed_overrides: Optional[Dict[str, Any]] = None) -> List[sweep.Run]:
  """One run per placement (seed 0, or a fixed --config.train.seed's); every resolved config is validated before
  anything runs."""
  if not placements:
    raise ValueError(f'--placements is empty; give some of {", ".join(PLACEMENTS)} (any of perijax/placement.py)')
  grid, fixed_overrides = [f'model.norm.placement={",".join(placements)}'], dict(fixed_overrides or {})
  if sweep.SEED_FIELD in fixed_overrides:   # the sweep sets each run's seed: a one-value grid instead of seed 0
    grid.append(f'{sweep.SEED_FIELD}={sweep.format_value(fixed_overrides.pop(sweep.SEED_FIELD))}')
  return sweep.expand_grid(config, grid, seeds=1, root=root, fixed_overrides=fixed_overrides,
                           validate=config_lib.validate)


def write_report(runs: Sequence[sweep.Run], root: str, log=print) -> Dict[str, Any]:
  """Prints and writes the report and plots of `runs`; returns the report's data with the plot paths."""
  from perijax import plots  # pylint: disable=g-import-not-at-top  (matplotlib only here)
  # Named by placement alone ('pre', 'peri', 'post'): short table columns and plot legends.
  records = [runs_lib.load_run(run.workdir, run.overrides['model.norm.placement']) for run in runs
             if rundir.metrics_files(run.workdir)]
  text, data = report_lib.report(records)
  data['plots'] = plots.write_plots(records, os.path.join(root, 'plots'))
  text_path, json_path = os.path.join(root, 'report.txt'), os.path.join(root, 'report.json')
  with open(text_path, 'w') as f:
    f.write(text + '\n')
  with open(json_path, 'w') as f:
    json.dump(data, f, indent=1)
  log(text)
  log(f'\nwritten: {text_path}, {json_path}, plots: ' + ', '.join(data['plots']))
  return data


def run_demo(config_arg: str, config: ml_collections.ConfigDict, fixed_overrides: Dict[str, Any],
             placements: Sequence[str], root: str, python: str = sys.executable,
             run_command: sweep.RunCommand = sweep.subprocess_run_command, log=print) -> Dict[str, Any]:
  """Trains and evaluates every run not finished yet, then reports; raises if none finished (nothing to compare)."""
  runs = sweep.run_sweep(plan_runs(config, placements, root, fixed_overrides), root, config_arg, fixed_overrides,
                         python=python, run_command=run_command, sweep_args={'demo': True}, log=log)
  if not any(run.status in ('finished', 'skipped') for run in runs):
    raise RuntimeError(f'no run of the demo finished; see the train.log and eval.log files under {root}')
  return write_report(runs, root, log)


def main(argv):
  del argv   # cli.run rejects positional arguments
  try:
    run_demo(*cli.config_and_overrides(), flags.FLAGS.placements, flags.FLAGS.root)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    raise ArgumentError(str(e)) from None


if __name__ == '__main__':
  cli.define_config_flags(default=DEFAULT_CONFIG)
  flags.DEFINE_string('root', os.path.join('runs', 'demo'), 'Directory of the runs, the report and the plots.')
  flags.DEFINE_list('placements', list(PLACEMENTS), 'Norm placements to train and compare.')
  cli.run(main)
