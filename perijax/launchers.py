"""Launch scripts for a sweep's runs on a cluster: a SLURM array job, or `gcloud` commands for a TPU pod slice.

Both run each run's `perijax.train && perijax.evaluate` line, the one `perijax.sweep --print` prints (sweep.py makes
the lines; this module only wraps them), so a run trained here, on SLURM or on a pod is the same run.
"""

import os
import re
import shlex
import shutil
import subprocess
from typing import Sequence

from perijax.errors import UserError

SLURM_SCRIPT = 'sweep.sbatch'
SLURM_LOG_DIR = 'slurm'   # under the sweep root: one log per array task, <job id>_<task index>.out
_SLURM_TIME = re.compile(r'^(\d+-)?\d+(:\d+){0,2}$')   # minutes, [D-]HH:MM[:SS], ... as sbatch --time reads them


class LaunchError(UserError, ValueError):
  """A launcher flag perijax cannot use, or a scheduler that refused the job (the message says which)."""


def slurm_script(lines: Sequence[str], names: Sequence[str], *, root: str, job_name: str, chdir: str,
                 partition: str = '', time: str = '', gpus: int = 0, cpus: int = 0, max_parallel: int = 0,
                 options: Sequence[str] = ()) -> str:
  """An sbatch script whose array task i runs `lines[i]` (run `names[i]`), each logging to ROOT/slurm/%A_%a.out.

  `chdir`: the directory the lines' relative paths (config file, workdirs) are relative to. `options`: any further
  sbatch options, e.g. '--account=proj' or '--qos=high', one `#SBATCH` line each.
  """
  if not lines or len(lines) != len(names):
    raise LaunchError(f'an array job needs one name per command line (got {len(lines)} lines, {len(names)} names)')
  if time and not _SLURM_TIME.match(time):
    raise LaunchError(f'--time={time!r}: expected a SLURM time limit: minutes, HH:MM:SS or D-HH:MM, e.g. 12:00:00')
  for value, name in ((gpus, 'gpus'), (cpus, 'cpus'), (max_parallel, 'max_parallel')):
    if value < 0:
      raise LaunchError(f'--{name}={value}: expected a count >= 0 (0 = not set)')
  bad = [option for option in options if not option.startswith('--') or '\n' in option]
  if bad:
    raise LaunchError(f'--slurm_option={bad[0]!r}: expected one sbatch option, e.g. --account=proj')
  array = f'0-{len(lines) - 1}' + (f'%{max_parallel}' if max_parallel else '')
  sbatch = [f'--job-name={job_name}', f'--array={array}', f'--output={os.path.join(root, SLURM_LOG_DIR, "%A_%a.out")}',
            f'--chdir={chdir}', '--ntasks=1']
  sbatch += [f'--partition={partition}'] * bool(partition) + [f'--time={time}'] * bool(time)
  sbatch += [f'--gpus={gpus}'] * bool(gpus) + [f'--cpus-per-task={cpus}'] * bool(cpus) + list(options)
  script = ['#!/bin/bash', f'# perijax sweep of {len(lines)} runs under {root}: array task i trains and evaluates '
            'run i.']
  script += [f'#SBATCH {shlex.quote(option)}' for option in sbatch]
  script += ['set -euo pipefail', 'case "$SLURM_ARRAY_TASK_ID" in']
  for index, (line, name) in enumerate(zip(lines, names)):
    script += [f'  {index})  # {name}', f'    {line}', '    ;;']
  script += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', 'esac', '']
  return '\n'.join(script)


def write_slurm_script(root: str, script: str) -> str:
  """ROOT/sweep.sbatch (and ROOT/slurm/ for the logs, which sbatch does not create); returns the script's path."""
  os.makedirs(os.path.join(root, SLURM_LOG_DIR), exist_ok=True)
  path = os.path.join(root, SLURM_SCRIPT)
  with open(path, 'w') as f:
    f.write(script)
  return path


def submit_slurm(path: str) -> str:
  """`sbatch --parsable PATH`; returns the job id, or raises LaunchError with sbatch's own message."""
  if shutil.which('sbatch') is None:
    raise LaunchError(f'--submit: sbatch is not on PATH (not a SLURM login node?); the script is {path}, submit it '
                      'with `sbatch` where SLURM runs')
  result = subprocess.run(['sbatch', '--parsable', path], capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise LaunchError(f'sbatch {path} exited with {result.returncode}: {" ".join(result.stderr.split())}')
  return result.stdout.strip().split(';')[0]   # --parsable prints "jobid[;cluster]"


def tpu_vm_commands(lines: Sequence[str], names: Sequence[str], *, tpu: str, zone: str, remote_dir: str) -> list[str]:
  """One `gcloud compute tpus tpu-vm ssh ... --worker=all` line per run, running its line on every worker of the pod
  (JAX finds the other workers from the TPU metadata: no coordinator flags). Paths in the lines are read on the
  workers, relative to `remote_dir` (the perijax checkout there); the sweep root must be a path all workers share."""
  if not tpu or not zone:
    raise LaunchError('--launcher=tpu_vm needs --tpu=NAME and --zone=ZONE (the pod slice `gcloud compute tpus '
                      'tpu-vm list --zone=ZONE` shows)')
  commands = []
  for line, name in zip(lines, names):
    remote = f'cd {shlex.quote(remote_dir)} && {line}' if remote_dir else line
    commands += [f'# {name}', shlex.join(['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}',
                                          '--worker=all', f'--command={remote}'])]
  return commands
