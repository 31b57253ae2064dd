r"""Sweeps a grid of config overrides × seeds: runs it here, prints one command per run, or writes (and submits) a
SLURM array job or the `gcloud` commands of a TPU pod slice for it (README, "Experiments, sweeps and inspection").

    python -m perijax.sweep --config=configs/tiny.py --sweep=model.norm.placement=pre,peri,post \
        --sweep=optimizer.lr=1e-3,3e-3 --seeds=3 --root=/tmp/sweep [--print | --launcher=slurm | --launcher=tpu_vm]

`--config.a.b=value` fixes a field for every run, except train.seed, which the sweep sets (`--seeds=N`: 0..N-1, or
`--sweep=train.seed=...`); every swept field and value is checked before anything runs.
Each run's workdir is `ROOT/<short field>=<value>,...,seed=<k>` (e.g. `ROOT/placement=peri,lr=0.001,seed=1`);
ROOT/sweep.json lists the runs and how each went. A run is finished when `eval/step_{train.steps}.json` exists:
finished runs are skipped, others started again (the trainer resumes from their checkpoints); a failed run is
recorded and the sweep goes on. The launchers run each unfinished run's `--print` line, so a run is the same run here,
on SLURM or on a TPU pod slice.
"""

import collections
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import ml_collections
from ml_collections.config_flags import config_path

from perijax import cli
from perijax import config as config_lib
from perijax import progress
from perijax import rundir
from perijax.errors import ArgumentError

FLAGS = flags.FLAGS
SEED_FIELD = 'train.seed'
_UNSAFE_NAME_CHARS = re.compile(r'[^A-Za-z0-9._=,+-]')
_SLURM_TIME = re.compile(r'^(\d+-)?\d+(:\d+){0,2}$')   # minutes, [D-]HH:MM[:SS], ... as sbatch --time reads them
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


def split_values(text: str) -> List[str]:
  """Splits 'a,b,(c,d)' at commas outside brackets, so a tuple field can be swept too."""
  values, depth, start = [], 0, 0
  for end, char in enumerate(text + ','):
    depth += (char in '([{') - (char in ')]}')
    if char == ',' and depth == 0:
      values.append(text[start:end].strip())
      start = end + 1
  return values


def parse_sweep(config: ml_collections.ConfigDict, spec: str) -> Tuple[str, List[Any]]:
  """'optimizer.lr=1e-3,3e-3' -> ('optimizer.lr', [0.001, 0.003]), typed like the config's field."""
  field, equals, text = spec.partition('=')
  if not equals:
    raise ArgumentError(f'--sweep={spec!r}: expected FIELD=VALUE[,VALUE...], e.g. model.norm.placement=pre,peri')
  texts = split_values(text)
  if not all(texts):
    raise ArgumentError(f'--sweep={spec!r}: empty value in the list')
  field = field.strip().removeprefix('config.')
  values = [config_lib.parse_value(config, field, value) for value in texts]
  if len(set(map(repr, values))) != len(values):
    raise ArgumentError(f'--sweep={spec!r}: a value is repeated ({values})')
  return field, values


def format_value(value: Any) -> str:
  """A value as `--config.x=` and `config.parse_value` read it back: floats keep full precision, bools true/false."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  return repr(value) if isinstance(value, (float, tuple)) else str(value)


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
  """'placement=peri,lr=0.001,seed=1', path-safe; a tuple value's items are joined by '+'."""
  labels = ['+'.join(map(str, value)) if isinstance(value, tuple) else format_value(value)
            for value in overrides.values()]
  name = ','.join(f'{names[field]}={label}' for field, label in zip(overrides, labels))
  return _UNSAFE_NAME_CHARS.sub('_', name or 'run')


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
  """Grid × seeds -> runs, each with its overrides (swept fields in order, then `train.seed`) and final step. Raises
  ArgumentError or ConfigError (ValueErrors) before anything runs if a field does not exist, a value does not parse,
  the grid is ambiguous, or `validate` (e.g. `perijax.config.validate`) rejects a run's resolved config."""
  if seeds < 1:
    raise ArgumentError(f'--seeds={seeds}: need at least 1 seed')
  grid = [parse_sweep(config, spec) for spec in sweeps]
  fields = [field for field, _ in grid]
  repeated = sorted({f for f in fields if fields.count(f) > 1})
  if repeated:
    raise ArgumentError(f'field(s) {repeated} swept twice; give each field once with all its values')
  if SEED_FIELD in fields and seeds > 1:
    raise ArgumentError(f'{SEED_FIELD} is swept and --seeds={seeds} is given; use one or the other')
  if SEED_FIELD in (fixed_overrides or {}):   # each run's own seed would replace it, silently
    seed = format_value(fixed_overrides[SEED_FIELD])
    raise ArgumentError(f'--config.{SEED_FIELD}={seed} is replaced by the sweep\'s own seeds; use '
                        f'--sweep={SEED_FIELD}={seed} for seed {seed}, or --seeds=N for seeds 0..N-1')
  if SEED_FIELD not in fields:
    grid.append((SEED_FIELD, list(range(seeds))))
    fields.append(SEED_FIELD)
  names = short_names(fields)
  runs = []
  for values in itertools.product(*[values for _, values in grid]):
    overrides = dict(zip(fields, values))
    resolved = resolve(config, {**(fixed_overrides or {}), **overrides})
    name = run_name(overrides, names)
    if validate is not None:
      try:
        validate(resolved)
      except ValueError as e:
        raise ArgumentError(f'run {name}: {e}') from None
    runs.append(Run(name, os.path.join(root, name), overrides, steps=int(resolved.train.steps)))
  return runs


def train_command(run: Run, config_arg: str, fixed_overrides: Dict[str, Any], python: str) -> List[str]:
  return ([python, '-m', 'perijax.train', f'--config={config_arg}', f'--workdir={run.workdir}'] +
          [f'--config.{field}={format_value(value)}' for field, value in {**fixed_overrides, **run.overrides}.items()])


def evaluate_command(workdir: str, step: int, python: str) -> List[str]:
  return [python, '-m', 'perijax.evaluate', f'--workdir={workdir}', f'--step={step}']


def is_finished(run: Run) -> bool:
  return rundir.eval_result(run.workdir, run.steps).exists()


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The highest finished Orbax step under `workdir/checkpoints` (temporary directories are not all digits)."""
  directory = rundir.checkpoints(workdir)
  steps = [int(path.name) for path in directory.iterdir() if path.name.isdigit()] if directory.is_dir() else []
  return max(steps, default=None)


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
    json.dump({**header, 'runs': [dataclasses.asdict(r) for r in runs]}, f, indent=1, default=str)
  os.replace(tmp_path, path)   # a sweep killed mid-write leaves the previous sweep.json whole


def execute_run(run: Run, config_arg: str, fixed_overrides: Dict[str, Any], python: str,
                run_command: RunCommand, evaluate: bool = True) -> None:
  """Trains (or resumes) and, with `evaluate`, evaluates one run (without, a run trained to its last step is
  finished); sets `run.status` and `run.detail`, never raises for a failed run."""
  trained = latest_checkpoint_step(run.workdir) == run.steps   # then it only needs its evaluation
  if is_finished(run) or (trained and not evaluate):
    run.status, run.detail = 'skipped', 'already finished'
    return
  train_log, eval_log = (str(rundir.command_log(run.workdir, command)) for command in ('train', 'eval'))
  if not trained and (status := run_command(train_command(run, config_arg, fixed_overrides, python), train_log)):
    run.status, run.detail = 'failed', f'perijax.train exited with {status}; see {train_log}'
    return
  step = latest_checkpoint_step(run.workdir)
  if step is None:
    run.status, run.detail = 'failed', f'no checkpoint in {rundir.checkpoints(run.workdir)} to evaluate'
  elif evaluate and (status := run_command(evaluate_command(run.workdir, step, python), eval_log)):
    run.status, run.detail = 'eval_failed', f'perijax.evaluate exited with {status}; see {eval_log}'
  elif is_finished(run) if evaluate else step == run.steps:
    run.status, run.detail = 'finished', ''
  else:
    run.status, run.detail = 'ended_early', f'training stopped at step {step} of {run.steps} (diverged?)'


def run_sweep(runs: Sequence[Run], root: str, config_arg: str, fixed_overrides: Optional[Dict[str, Any]] = None,
              python: str = sys.executable, run_command: RunCommand = subprocess_run_command,
              sweep_args: Optional[Dict[str, Any]] = None,
              log: Callable[[str], None] = progress.write, evaluate: bool = True) -> List[Run]:
  """Runs every unfinished run in order (see `execute_run`), recording each in ROOT/sweep.json; returns the runs."""
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
  counts = collections.Counter(run.status for run in runs)
  lines = [f'sweep: {len(runs)} runs: ' + ', '.join(f'{n} {status}' for status, n in sorted(counts.items()))]
  lines += [f'  {run.status}: {run.name}: {run.detail}' for run in runs
            if run.status in ('failed', 'eval_failed', 'ended_early')]
  return '\n'.join(lines)


def print_commands(runs: Sequence[Run], config_arg: str, fixed_overrides: Dict[str, Any], python: str) -> List[str]:
  """One shell line per run, `train && evaluate`, for a scheduler; writes nothing."""
  return [shlex.join(train_command(run, config_arg, fixed_overrides, python)) + ' && ' +
          shlex.join(evaluate_command(run.workdir, run.steps, python)) for run in runs]


def slurm_script(lines: Sequence[str], names: Sequence[str], *, root: str, job_name: str, chdir: str,
                 partition: str = '', time: str = '', gpus: int = 0, cpus: int = 0, max_parallel: int = 0,
                 options: Sequence[str] = ()) -> str:
  """An sbatch script whose array task i runs `lines[i]` (run `names[i]`), each logging to ROOT/slurm/%A_%a.out.
  `chdir`: the directory the lines' relative paths are relative to. `options`: further sbatch options, e.g.
  '--account=proj', one `#SBATCH` line each."""
  if not lines or len(lines) != len(names):
    raise ArgumentError(f'an array job needs one name per command line (got {len(lines)} lines, {len(names)} names)')
  if time and not _SLURM_TIME.match(time):
    raise ArgumentError(f'--time={time!r}: expected a SLURM time limit: minutes, HH:MM:SS or D-HH:MM, e.g. 12:00:00')
  bad = [option for option in options if not option.startswith('--') or '\n' in option]
  if bad:
    raise ArgumentError(f'--slurm_option={bad[0]!r}: expected one sbatch option, e.g. --account=proj')
  sbatch = [f'--job-name={job_name}', f'--array=0-{len(lines) - 1}' + (f'%{max_parallel}' if max_parallel else ''),
            f'--output={os.path.join(root, "slurm", "%A_%a.out")}', f'--chdir={chdir}', '--ntasks=1']
  sbatch += [f'--{name}={value}' for name, value in (('partition', partition), ('time', time), ('gpus', gpus),
                                                     ('cpus-per-task', cpus)) if value] + list(options)
  script = ['#!/bin/bash', f'# perijax sweep of {len(lines)} runs under {root}: array task i trains and evaluates '
            'run i.', *[f'#SBATCH {shlex.quote(option)}' for option in sbatch], 'set -euo pipefail',
            'case "$SLURM_ARRAY_TASK_ID" in']
  for index, (line, name) in enumerate(zip(lines, names)):
    script += [f'  {index})  # {name}', f'    {line}', '    ;;']
  script += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', 'esac', '']
  return '\n'.join(script)


def submit_slurm(path: str) -> str:
  """`sbatch --parsable PATH`; returns the job id, or raises ArgumentError with sbatch's own message."""
  if shutil.which('sbatch') is None:
    raise ArgumentError(f'--submit: sbatch is not on PATH (not a SLURM login node?); the script is {path}, submit it '
                        'with `sbatch` where SLURM runs')
  result = subprocess.run(['sbatch', '--parsable', path], capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise ArgumentError(f'sbatch {path} exited with {result.returncode}: {" ".join(result.stderr.split())}')
  return result.stdout.strip().split(';')[0]   # --parsable prints "jobid[;cluster]"


def tpu_vm_commands(lines: Sequence[str], names: Sequence[str], *, tpu: str, zone: str, remote_dir: str) -> list[str]:
  """Per run, a comment naming it and a `gcloud compute tpus tpu-vm ssh ... --worker=all` line running its line on
  every worker of the pod (JAX finds the other workers itself) in `remote_dir`, the perijax checkout there. Paths in
  the lines are read on the workers: the sweep root must be one they all share."""
  if not tpu or not zone:
    raise ArgumentError('--launcher=tpu_vm needs --tpu=NAME and --zone=ZONE (the pod slice `gcloud compute tpus '
                        'tpu-vm list --zone=ZONE` shows)')
  gcloud = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}', '--worker=all']
  remote = f'cd {shlex.quote(remote_dir)} && ' if remote_dir else ''
  commands = []
  for line, name in zip(lines, names):
    commands += [f'# {name}', shlex.join(gcloud + [f'--command={remote}{line}'])]
  return commands


def launch(runs: Sequence[Run], root: str, config_arg: str, fixed_overrides: Dict[str, Any], python: str,
           launcher: str, sweep_args: Dict[str, Any], launch_flags) -> str:
  """--launcher=slurm|tpu_vm for the unfinished runs; returns what to tell the user. Raises ArgumentError."""
  pending = [run for run in runs if not is_finished(run)]
  if not pending:
    return f'every run under {root} is finished; nothing to launch'
  lines, names = print_commands(pending, config_arg, fixed_overrides, python), [run.name for run in pending]
  if launcher == 'tpu_vm':
    return '\n'.join(tpu_vm_commands(lines, names, tpu=launch_flags.tpu, zone=launch_flags.zone,
                                     remote_dir=launch_flags.remote_dir))
  script = slurm_script(
      lines, names, root=root, job_name=f'perijax-{os.path.basename(os.path.normpath(root))}', chdir=os.getcwd(),
      partition=launch_flags.partition, time=launch_flags.time, gpus=launch_flags.gpus, cpus=launch_flags.cpus,
      max_parallel=launch_flags.max_parallel, options=launch_flags.slurm_option)
  os.makedirs(os.path.join(root, 'slurm'), exist_ok=True)   # sbatch does not create the log directory
  path = os.path.join(root, 'sweep.sbatch')
  with open(path, 'w') as f:
    f.write(script)
  job = submit_slurm(path) if launch_flags.submit else None
  for run in runs:
    run.status, run.detail = ('pending', f'slurm array task {pending.index(run)}' + (f' of job {job}' if job else '')
                              ) if run in pending else ('skipped', 'already finished')
  write_sweep_json(root, runs, {'config': config_arg, 'fixed_overrides': fixed_overrides, **sweep_args,
                                'launcher': 'slurm', 'slurm_job': job})
  left_out = f' ({len(runs) - len(pending)} finished runs left out)' if len(pending) < len(runs) else ''
  if job:
    return f'submitted slurm job {job}: {len(pending)} array tasks{left_out}; logs in {root}/slurm/'
  return f'wrote {path}: {len(pending)} array tasks{left_out}; submit it with: sbatch {shlex.quote(path)}'


def main(argv):
  del argv   # cli.run rejects positional arguments
  config_arg, config, fixed_overrides = cli.config_and_overrides()
  runs = expand_grid(config, FLAGS.sweep, FLAGS.seeds, FLAGS.root, fixed_overrides, validate=config_lib.validate)
  if FLAGS.print and FLAGS.launcher != 'local':
    raise ArgumentError(f'give --print or --launcher={FLAGS.launcher}, not both')
  if FLAGS.submit and FLAGS.launcher != 'slurm':
    raise ArgumentError('--submit submits a SLURM script; it needs --launcher=slurm')
  sweep_args = {'sweep': list(FLAGS.sweep), 'seeds': FLAGS.seeds}
  if FLAGS.print:
    print('\n'.join(print_commands(runs, config_arg, fixed_overrides, FLAGS.python or 'python')))
  elif FLAGS.launcher != 'local':
    python = FLAGS.python or ('python' if FLAGS.launcher == 'tpu_vm' else sys.executable)
    print(launch(runs, FLAGS.root, config_arg, fixed_overrides, python, FLAGS.launcher, sweep_args, FLAGS))
  else:
    runs = run_sweep(runs, FLAGS.root, config_arg, fixed_overrides, python=FLAGS.python or sys.executable,
                     sweep_args=sweep_args)
    if any(run.status in ('failed', 'eval_failed') for run in runs):
      sys.exit(1)   # after every run was tried: a scheduler sees that something needs a look


if __name__ == '__main__':
  cli.define_config_flags()
  flags.DEFINE_multi_string('sweep', [], 'FIELD=V1,V2,...: a swept config field and its values (repeatable).')
  flags.DEFINE_integer('seeds', 1, 'Seeds per grid point: train.seed = 0 .. seeds-1.')
  flags.DEFINE_string('root', None, 'Directory that holds one workdir per run and sweep.json.')
  cli.require('root', 'the directory of the runs, e.g. --root=runs/sweep')
  flags.DEFINE_bool('print', False, 'Print one command line per run instead of running; writes nothing.')
  flags.DEFINE_string('python', None, 'Python interpreter in the commands (default: this one; `python` with --print '
                      'and --launcher=tpu_vm, whose commands run on other machines).')
  flags.DEFINE_enum('launcher', 'local', ['local', 'slurm', 'tpu_vm'], 'local: run here, one run after another; '
                    'slurm: write ROOT/sweep.sbatch (an array job); tpu_vm: print gcloud commands for a TPU pod.')
  flags.DEFINE_bool('submit', False, '--launcher=slurm: also submit the script with sbatch.')
  flags.DEFINE_string('partition', '', 'slurm: --partition of each array task.')
  flags.DEFINE_string('time', '', 'slurm: --time limit of each array task, e.g. 12:00:00.')
  flags.DEFINE_integer('gpus', 0, 'slurm: --gpus of each array task; 0 = not set.', lower_bound=0)
  flags.DEFINE_integer('cpus', 0, 'slurm: --cpus-per-task; 0 = not set.', lower_bound=0)
  flags.DEFINE_integer('max_parallel', 0, 'slurm: array tasks at once (--array=...%N); 0 = no limit.', lower_bound=0)
  flags.DEFINE_multi_string('slurm_option', [], 'slurm: another #SBATCH option, e.g. --account=proj (repeatable).')
  flags.DEFINE_string('tpu', '', 'tpu_vm: the TPU VM (pod slice) name.')
  flags.DEFINE_string('zone', '', 'tpu_vm: its zone.')
  flags.DEFINE_string('remote_dir', 'perijax', 'tpu_vm: the perijax checkout on the workers (relative to home), '
                      'where the commands run.')
  cli.run(main)
