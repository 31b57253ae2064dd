r"""Sweeps a grid of config overrides × seeds: runs it here, one workdir per run, or prints one command per run.

    python -m perijax.sweep --config=configs/tiny.py \
        --sweep=model.norm.placement=pre,peri,post --sweep=optimizer.lr=1e-3,3e-3 --seeds=3 --root=/tmp/sweep
    python -m perijax.sweep ... --print      # one `perijax.train && perijax.evaluate` line per run, for a scheduler
    python -m perijax.sweep ... --launcher=slurm [--submit] [--partition=P --time=12:00:00 --gpus=1]
    python -m perijax.sweep ... --launcher=tpu_vm --tpu=NAME --zone=ZONE   # gcloud commands, one per run

`--config.a.b=value` flags fix a field for every run (as for `perijax.train`). Each run's workdir is
`ROOT/<short field>=<value>,...,seed=<k>` (e.g. `ROOT/placement=peri,lr=0.001,seed=1`), and `ROOT/sweep.json` lists
the runs, their overrides and how each one went. A run is finished when `eval/step_{train.steps}.json` exists: finished
runs are skipped, the others are started again (the trainer resumes from their checkpoints). A run that fails is
recorded and the sweep goes on; the summary says which failed and where their logs are.
Every swept field and value is checked against the loaded config before anything runs.
`--launcher=slurm` writes ROOT/sweep.sbatch, an array job with one task per unfinished run (each runs its --print
line; logs in ROOT/slurm/), and ROOT/sweep.json; `--submit` also submits it with sbatch. `--launcher=tpu_vm` prints a
`gcloud compute tpus tpu-vm ssh --worker=all` command per unfinished run, each running the run's line on every worker
of the pod slice (perijax/launchers.py).
"""

import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import ml_collections
from ml_collections.config_flags import config_path

from perijax import cli
from perijax import config as config_lib
from perijax import launchers
from perijax import progress
from perijax import rundir
from perijax.errors import ArgumentError

SEED_FIELD = 'train.seed'
STEPS_FIELD = 'train.steps'
_UNSAFE_NAME_CHARS = re.compile(r'[^A-Za-z0-9._=,+-]')

# `run_command(argv, log_path) -> exit status`: the one place a sweep touches processes, so tests can replace it.
RunCommand = Callable[[Sequence[str], str], int]


@dataclasses.dataclass
class Run:
  """One point of the grid: its name, workdir, overrides (field path -> typed value) and final step."""
  name: str
  workdir: str
  overrides: Dict[str, Any]
  steps: int
  status: str = 'pending'   # pending | finished | skipped | failed | eval_failed | ended_early
  detail: str = ''

  def to_dict(self):
    return dataclasses.asdict(self)


def load_config(config_arg: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` the way `--config=` does, with one clear error if the file is missing or broken."""
  return config_lib.load_file(config_arg)


def split_values(text: str) -> List[str]:
  """Splits 'a,b,(c,d)' at commas outside brackets, so a tuple field can be swept too."""
  values, depth, current = [], 0, ''
  for char in text:
    depth += char in '([{'
    depth -= char in ')]}'
    if char == ',' and depth == 0:
      values.append(current)
      current = ''
    else:
      current += char
  values.append(current)
  return [v.strip() for v in values]


def parse_sweep(config: ml_collections.ConfigDict, spec: str) -> Tuple[str, List[Any]]:
  """'optimizer.lr=1e-3,3e-3' -> ('optimizer.lr', [0.001, 0.003]), typed like the config's field."""
  if '=' not in spec:
    raise ValueError(f'--sweep={spec!r}: expected FIELD=VALUE[,VALUE...], e.g. model.norm.placement=pre,peri')
  field, text = spec.split('=', 1)
  field = field.strip()
  if field.startswith('config.'):
    field = field[len('config.'):]
  raw_values = split_values(text)
  if not text.strip() or any(not v for v in raw_values):
    raise ValueError(f'--sweep={spec!r}: empty value in the list')
  values = [config_lib.parse_value(config, field, v) for v in raw_values]
  if len(set(map(repr, values))) != len(values):
    raise ValueError(f'--sweep={spec!r}: a value is repeated ({values})')
  return field, values


def format_value(value: Any) -> str:
  """A value as `--config.x=` and `config.parse_value` read it back: floats keep full precision, bools true/false."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, tuple):
    return repr(value)
  return str(value)


def short_names(fields: Sequence[str]) -> Dict[str, str]:
  """The shortest dotted suffix of each field that is unique among `fields` ('model.norm.eps' -> 'norm.eps')."""
  names = {}
  for field in fields:
    parts = field.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if sum(f == suffix or f.endswith('.' + suffix) for f in fields) == 1:
        names[field] = suffix
        break
  return names


def run_name(overrides: Dict[str, Any], names: Dict[str, str]) -> str:
  def label(value):
    return '+'.join(map(str, value)) if isinstance(value, tuple) else format_value(value)
  name = ','.join(f'{names[field]}={label(value)}' for field, value in overrides.items()) or 'run'
  return _UNSAFE_NAME_CHARS.sub('_', name)


def resolve(config: ml_collections.ConfigDict, overrides: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` applied, as `perijax.train` will see it."""
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    for field, value in overrides.items():
      config_path.set_value(field, resolved, value)
  return resolved


def expand_grid(config: ml_collections.ConfigDict, sweeps: Sequence[str], seeds: int, root: str,
                fixed_overrides: Optional[Dict[str, Any]] = None,
                validate: Optional[Callable[[ml_collections.ConfigDict], Any]] = None) -> List[Run]:
  """Grid × seeds -> runs, each with its overrides (swept fields in order, then `train.seed`) and final step.

  Raises ValueError before anything runs if a field does not exist, a value does not parse, the grid is ambiguous,
  or `validate` (e.g. `perijax.config.validate`) rejects a run's resolved config.
  """
  if seeds < 1:
    raise ValueError(f'--seeds={seeds}: need at least 1 seed')
  grid = [parse_sweep(config, spec) for spec in sweeps]
  fields = [field for field, _ in grid]
  repeated = sorted({f for f in fields if fields.count(f) > 1})
  if repeated:
    raise ValueError(f'field(s) {repeated} swept twice; give each field once with all its values')
  if SEED_FIELD in fields and seeds > 1:
    raise ValueError(f'{SEED_FIELD} is swept and --seeds={seeds} is given; use one or the other')
  if SEED_FIELD not in fields:
    grid.append((SEED_FIELD, list(range(seeds))))
    fields.append(SEED_FIELD)
  names = short_names(fields)
  fixed_overrides = dict(fixed_overrides or {})

  runs = []
  for values in itertools.product(*[values for _, values in grid]):
    overrides = dict(zip(fields, values))
    resolved = resolve(config, {**fixed_overrides, **overrides})
    name = run_name(overrides, names)
    if validate is not None:
      try:
        validate(resolved)
      except ValueError as e:
        raise ValueError(f'run {name}: {e}') from None
    steps = config_path.get_value(STEPS_FIELD, resolved)
    runs.append(Run(name=name, workdir=os.path.join(root, name), overrides=overrides, steps=int(steps)))
  return runs


def train_command(run: Run, config_arg: str, fixed_overrides: Dict[str, Any], python: str) -> List[str]:
  overrides = {**fixed_overrides, **run.overrides}
  return ([python, '-m', 'perijax.train', f'--config={config_arg}', f'--workdir={run.workdir}'] +
          [f'--config.{field}={format_value(value)}' for field, value in overrides.items()])


def evaluate_command(workdir: str, step: int, python: str) -> List[str]:
  return [python, '-m', 'perijax.evaluate', f'--workdir={workdir}', f'--step={step}']


def is_finished(run: Run) -> bool:
  return rundir.eval_result(run.workdir, run.steps).exists()


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The highest finished Orbax step under `workdir/checkpoints` (temporary directories are not all digits)."""
  directory = rundir.checkpoints(workdir)
  if not directory.is_dir():
    return None
  steps = [int(path.name) for path in directory.iterdir() if path.name.isdigit()]
  return max(steps) if steps else None


def subprocess_run_command(argv: Sequence[str], log_path: str) -> int:
  """Runs `argv`, appending its stdout and stderr to `log_path`."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'a') as log:
    log.write(f'$ {shlex.join(argv)}\n')
    log.flush()
    return subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def write_sweep_json(root: str, runs: Sequence[Run], header: Dict[str, Any]) -> None:
  path = os.path.join(root, 'sweep.json')
  tmp_path = f'{path}.{os.getpid()}.tmp'   # per process: two sweeps sharing a root must not rename each other's file
  with open(tmp_path, 'w') as f:
    json.dump({**header, 'runs': [r.to_dict() for r in runs]}, f, indent=1, default=str)
  os.replace(tmp_path, path)   # a sweep killed mid-write leaves the previous sweep.json whole


def execute_run(run: Run, config_arg: str, fixed_overrides: Dict[str, Any], python: str,
                run_command: RunCommand, evaluate: bool = True) -> None:
  """Trains (or resumes) and evaluates one run; sets `run.status` and `run.detail`, never raises for a failed run.
  Without `evaluate`, a run is finished once trained to its last step."""
  if is_finished(run) or (not evaluate and latest_checkpoint_step(run.workdir) == run.steps):
    run.status, run.detail = 'skipped', 'already finished'
    return
  if latest_checkpoint_step(run.workdir) != run.steps:   # a run trained to the end only needs its evaluation
    train_log = str(rundir.command_log(run.workdir, 'train'))
    status = run_command(train_command(run, config_arg, fixed_overrides, python), train_log)
    if status != 0:
      run.status, run.detail = 'failed', f'perijax.train exited with {status}; see {train_log}'
      return
  step = latest_checkpoint_step(run.workdir)
  if step is None:
    run.status, run.detail = 'failed', f'no checkpoint in {rundir.checkpoints(run.workdir)} to evaluate'
    return
  if not evaluate:
    run.status, run.detail = ('finished', '') if step == run.steps else (
        'ended_early', f'training stopped at step {step} of {run.steps} (diverged?)')
    return
  eval_log = str(rundir.command_log(run.workdir, 'eval'))
  status = run_command(evaluate_command(run.workdir, step, python), eval_log)
  if status != 0:
    run.status, run.detail = 'eval_failed', f'perijax.evaluate exited with {status}; see {eval_log}'
  elif is_finished(run):
    run.status, run.detail = 'finished', ''
  else:
    run.status, run.detail = 'ended_early', f'training stopped at step {step} of {run.steps} (diverged?)'


def run_sweep(runs: Sequence[Run], root: str, config_arg: str, fixed_overrides: Optional[Dict[str, Any]] = None,
              python: str = sys.executable, run_command: RunCommand = subprocess_run_command,
              sweep_args: Optional[Dict[str, Any]] = None,
              log: Callable[[str], None] = progress.write, evaluate: bool = True) -> List[Run]:
  """Runs every unfinished run in order (`evaluate`: train then evaluate; else train only), recording each in
  ROOT/sweep.json; returns the runs with their status."""
  fixed_overrides = dict(fixed_overrides or {})
  os.makedirs(root, exist_ok=True)
  header = {'config': config_arg, 'fixed_overrides': fixed_overrides, **(sweep_args or {})}
  write_sweep_json(root, runs, header)
  for index, run in enumerate(progress.progress(runs, 'sweep', unit='run', leave=True), 1):
    start = time.time()
    log(f'[{index}/{len(runs)}] {run.name}: running')
    execute_run(run, config_arg, fixed_overrides, python, run_command, evaluate)
    log(f'[{index}/{len(runs)}] {run.name}: {run.status} ({time.time() - start:.0f}s) {run.detail}'.rstrip())
    write_sweep_json(root, runs, header)
  log(summarize(runs))
  return list(runs)


def summarize(runs: Sequence[Run]) -> str:
  counts = {}
  for run in runs:
    counts[run.status] = counts.get(run.status, 0) + 1
  lines = [f'sweep: {len(runs)} runs: ' + ', '.join(f'{n} {status}' for status, n in sorted(counts.items()))]
  lines += [f'  {run.status}: {run.name}: {run.detail}' for run in runs
            if run.status in ('failed', 'eval_failed', 'ended_early')]
  return '\n'.join(lines)


def print_commands(runs: Sequence[Run], config_arg: str, fixed_overrides: Dict[str, Any], python: str) -> List[str]:
  """One shell line per run, `train && evaluate`, for a scheduler; writes nothing."""
  return [shlex.join(train_command(run, config_arg, fixed_overrides, python)) + ' && ' +
          shlex.join(evaluate_command(run.workdir, run.steps, python)) for run in runs]


def launch(runs: Sequence[Run], root: str, config_arg: str, fixed_overrides: Dict[str, Any], python: str,
           launcher: str, header: Dict[str, Any], launch_flags) -> str:
  """--launcher=slurm|tpu_vm for the unfinished runs; returns what to tell the user. Raises LaunchError."""
  pending = [run for run in runs if not is_finished(run)]
  left_out = f' ({len(runs) - len(pending)} finished runs left out)' if len(pending) < len(runs) else ''
  if not pending:
    return f'every run under {root} is finished; nothing to launch'
  lines = print_commands(pending, config_arg, fixed_overrides, python)
  names = [run.name for run in pending]
  if launcher == 'tpu_vm':
    return '\n'.join(launchers.tpu_vm_commands(lines, names, tpu=launch_flags.tpu, zone=launch_flags.zone,
                                               remote_dir=launch_flags.remote_dir))
  script = launchers.slurm_script(
      lines, names, root=root, job_name=f'perijax-{os.path.basename(os.path.normpath(root))}', chdir=os.getcwd(),
      partition=launch_flags.partition, time=launch_flags.time, gpus=launch_flags.gpus, cpus=launch_flags.cpus,
      max_parallel=launch_flags.max_parallel, options=launch_flags.slurm_option)
  path = launchers.write_slurm_script(root, script)
  job = launchers.submit_slurm(path) if launch_flags.submit else None
  task = {run.name: index for index, run in enumerate(pending)}
  for run in runs:
    if run.name in task:
      run.status, run.detail = 'pending', f'slurm array task {task[run.name]}' + (f' of job {job}' if job else '')
    else:
      run.status, run.detail = 'skipped', 'already finished'
  write_sweep_json(root, runs, {**header, 'launcher': 'slurm', 'slurm_job': job})
  if job:
    return f'submitted slurm job {job}: {len(pending)} array tasks{left_out}; logs in {root}/{launchers.SLURM_LOG_DIR}/'
  return f'wrote {path}: {len(pending)} array tasks{left_out}; submit it with: sbatch {shlex.quote(path)}'


FLAGS = flags.FLAGS


def define_flags():
  """Defines the CLI flags; called only when run as a program, so importing this module defines no global flags
  (perijax.train defines --config too, and both are imported in one test process)."""
  cli.define_config_flags()
  flags.DEFINE_multi_string('sweep', [], 'FIELD=V1,V2,...: a swept config field and its values (repeatable).')
  flags.DEFINE_integer('seeds', 1, 'Seeds per grid point: train.seed = 0 .. seeds-1.')
  flags.DEFINE_string('root', None, 'Directory that holds one workdir per run and sweep.json.')
  flags.DEFINE_bool('print', False, 'Print one command line per run instead of running; writes nothing.')
  flags.DEFINE_string('python', None, 'Python interpreter in the commands (default: this one; `python` with --print '
                      'and --launcher=tpu_vm, whose commands run on other machines).')
  flags.DEFINE_enum('launcher', 'local', ['local', 'slurm', 'tpu_vm'], 'local: run here, one run after another; '
                    'slurm: write ROOT/sweep.sbatch (an array job); tpu_vm: print gcloud commands for a TPU pod.')
  flags.DEFINE_bool('submit', False, '--launcher=slurm: also submit the script with sbatch.')
  flags.DEFINE_string('partition', '', 'slurm: --partition of each array task.')
  flags.DEFINE_string('time', '', 'slurm: --time limit of each array task, e.g. 12:00:00.')
  flags.DEFINE_integer('gpus', 0, 'slurm: --gpus of each array task; 0 = not set.')
  flags.DEFINE_integer('cpus', 0, 'slurm: --cpus-per-task; 0 = not set.')
  flags.DEFINE_integer('max_parallel', 0, 'slurm: array tasks running at once (--array=...%N); 0 = no limit.')
  flags.DEFINE_multi_string('slurm_option', [], 'slurm: another #SBATCH option, e.g. --account=proj (repeatable).')
  flags.DEFINE_string('tpu', '', 'tpu_vm: the TPU VM (pod slice) name.')
  flags.DEFINE_string('zone', '', 'tpu_vm: its zone.')
  flags.DEFINE_string('remote_dir', 'perijax', 'tpu_vm: the perijax checkout on the workers (relative to home), '
                      'where the commands run.')
  cli.require('root', 'the directory of the runs, e.g. --root=runs/sweep')


def main(argv):
  if len(argv) > 1:
    raise ArgumentError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form --name=value')
  config_arg = FLAGS.config
  config = load_config(config_arg)
  fixed_overrides = config_lib.apply_overrides(config, cli.overrides())
  try:
    runs = expand_grid(config, FLAGS.sweep, FLAGS.seeds, FLAGS.root, fixed_overrides,
                       validate=config_lib.validate)
  except ValueError as e:  # ConfigError, or a --sweep/--seeds value expand_grid names
    raise ArgumentError(str(e)) from None
  if FLAGS.print and FLAGS.launcher != 'local':
    raise ArgumentError(f'give --print or --launcher={FLAGS.launcher}, not both')
  if FLAGS.submit and FLAGS.launcher != 'slurm':
    raise ArgumentError('--submit submits a SLURM script; it needs --launcher=slurm')
  if FLAGS.print:
    print('\n'.join(print_commands(runs, config_arg, fixed_overrides, FLAGS.python or 'python')))
    return
  sweep_args = {'sweep': list(FLAGS.sweep), 'seeds': FLAGS.seeds}
  if FLAGS.launcher != 'local':
    python = FLAGS.python or ('python' if FLAGS.launcher == 'tpu_vm' else sys.executable)
    header = {'config': config_arg, 'fixed_overrides': fixed_overrides, **sweep_args}
    print(launch(runs, FLAGS.root, config_arg, fixed_overrides, python, FLAGS.launcher, header, FLAGS))
    return
  finished = run_sweep(runs, FLAGS.root, config_arg, fixed_overrides, python=FLAGS.python or sys.executable,
                       sweep_args=sweep_args)
  if any(run.status in ('failed', 'eval_failed') for run in finished):
    sys.exit(1)   # after every run was tried: a scheduler sees that something needs a look


if __name__ == '__main__':
  define_flags()
  cli.run(main)
