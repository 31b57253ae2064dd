"""Cluster launch of a sweep: the SLURM array script (as text, `bash -n`, and run task by task with a stand-in
Python) and submission through a stand-in sbatch; the TPU pod `gcloud` commands; bad launcher flags."""

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

from perijax import launchers
from perijax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
GRID = ['--sweep=model.norm.placement=pre,peri', '--seeds=2']


def executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def run_sweep_cli(root, *args, path_dirs=(), expect=0):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PATH': os.pathsep.join([*map(str, path_dirs), os.environ['PATH']])}
  result = subprocess.run([sys.executable, '-m', 'perijax.sweep', '--config=configs/tiny.py', *GRID, f'--root={root}',
                           '--config.train.steps=30', *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=env)
  assert result.returncode == expect, result.stderr
  return result


def slurm_runs(root):
  config = sweep.load_config(str(REPO / 'configs' / 'tiny.py'))
  return sweep.expand_grid(config, ['model.norm.placement=pre,peri'], seeds=2, root=str(root),
                           fixed_overrides={'train.steps': 30})


def test_slurm_script_runs_the_print_line_of_its_array_task(tmp_path):
  runs = slurm_runs(tmp_path / 'sweep')
  lines = sweep.print_commands(runs, 'configs/tiny.py', {'train.steps': 30}, str(tmp_path / 'py'))
  script = launchers.slurm_script(lines, [r.name for r in runs], root=str(tmp_path / 'sweep'), job_name='perijax-x',
                                  chdir=str(REPO), partition='gpu', time='12:00:00', gpus=1, cpus=8, max_parallel=2,
                                  options=['--account=proj'])
  header = [line for line in script.splitlines() if line.startswith('#SBATCH ')]
  assert header == ['#SBATCH --job-name=perijax-x', '#SBATCH --array=0-3%2',
                    f'#SBATCH --output={tmp_path}/sweep/slurm/%A_%a.out', f'#SBATCH --chdir={REPO}',
                    '#SBATCH --ntasks=1',
                    '#SBATCH --partition=gpu', '#SBATCH --time=12:00:00', '#SBATCH --gpus=1',
                    '#SBATCH --cpus-per-task=8', '#SBATCH --account=proj']
  assert all(f'    {line}' in script.splitlines() for line in lines)
  path = tmp_path / 'sweep.sbatch'
  path.write_text(script)
  assert subprocess.run(['bash', '-n', str(path)], capture_output=True, timeout=30).returncode == 0

  # Run array task 2 with a stand-in Python that records its arguments: it trains and evaluates run 2, nothing else.
  record = tmp_path / 'calls.txt'
  executable(tmp_path / 'py', f'#!/bin/bash\necho "$*" >> {shlex.quote(str(record))}\n')
  result = subprocess.run(['bash', str(path)], env={**os.environ, 'SLURM_ARRAY_TASK_ID': '2'}, capture_output=True,
                          text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  train, evaluate = record.read_text().splitlines()
  assert train.startswith('-m perijax.train --config=configs/tiny.py') and f'--workdir={runs[2].workdir}' in train
  assert '--config.model.norm.placement=peri' in train and '--config.train.seed=0' in train
  assert evaluate == f'-m perijax.evaluate --workdir={runs[2].workdir} --step=30'
  # A failing train step stops the task before evaluation; an unknown task id is an error.
  executable(tmp_path / 'py', f'#!/bin/bash\necho "$*" >> {shlex.quote(str(record))}\nexit 3\n')
  record.unlink()
  failed = subprocess.run(['bash', str(path)], env={**os.environ, 'SLURM_ARRAY_TASK_ID': '0'}, capture_output=True,
                          timeout=30)
  assert failed.returncode == 3 and len(record.read_text().splitlines()) == 1
  unknown = subprocess.run(['bash', str(path)], env={**os.environ, 'SLURM_ARRAY_TASK_ID': '4'}, capture_output=True,
                           text=True, timeout=30)
  assert unknown.returncode == 1 and 'no run for array task 4' in unknown.stderr


@pytest.mark.parametrize('kwargs, message', [
    ({'time': 'soon'}, "--time='soon'"), ({'gpus': -1}, '--gpus=-1'), ({'options': ['account=x']}, 'one sbatch option'),
])
def test_bad_slurm_flag_is_one_clear_error(kwargs, message):
  with pytest.raises(launchers.LaunchError, match=message):
    launchers.slurm_script(['true'], ['run'], root='r', job_name='j', chdir='.', **kwargs)


def test_cli_writes_the_script_for_unfinished_runs_and_submits_it(tmp_path):
  root = tmp_path / 'sweep root'
  finished = slurm_runs(root)[1]
  os.makedirs(os.path.join(finished.workdir, 'eval'))
  pathlib.Path(finished.workdir, 'eval', 'step_30.json').write_text('{}')
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  executable(bin_dir / 'sbatch', f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(tmp_path / "sbatch_args"))}\n'
                                 'echo "4242;cluster1"\n')
  result = run_sweep_cli(root, '--launcher=slurm', '--submit', '--gpus=1', '--python=py', path_dirs=[bin_dir])
  assert result.stdout.strip() == (f'submitted slurm job 4242: 3 array tasks (1 finished runs left out); logs in '
                                   f'{root}/slurm/')
  assert (tmp_path / 'sbatch_args').read_text().splitlines() == ['--parsable', f'{root}/sweep.sbatch']
  script = (root / 'sweep.sbatch').read_text()
  assert '#SBATCH --array=0-2' in script and '#SBATCH --gpus=1' in script and (root / 'slurm').is_dir()
  assert finished.name not in script and script.count('-m perijax.train') == 3
  recorded = json.loads((root / 'sweep.json').read_text())
  assert recorded['slurm_job'] == '4242'
  assert [r['status'] for r in recorded['runs']] == ['pending', 'skipped', 'pending', 'pending']
  assert recorded['runs'][2]['detail'] == 'slurm array task 1 of job 4242'


def test_cli_submit_without_sbatch_is_one_line_naming_the_script(tmp_path):
  empty = tmp_path / 'bin'
  empty.mkdir()
  result = subprocess.run([sys.executable, '-m', 'perijax.sweep', '--config=configs/tiny.py',
                           f'--root={tmp_path / "r"}', '--launcher=slurm', '--submit'], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'PATH': str(empty), 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f'perijax.sweep: error: --submit: sbatch is not on PATH (not a SLURM login node?); the script is {tmp_path}/r/'
      'sweep.sbatch, submit it with `sbatch` where SLURM runs']


def test_cli_tpu_vm_prints_one_gcloud_command_per_run_on_all_workers(tmp_path):
  root = tmp_path / 'sweep'
  out = run_sweep_cli(root, '--launcher=tpu_vm', '--tpu=pod-a', '--zone=us-central2-b').stdout.splitlines()
  names = [r.name for r in slurm_runs(root)]
  assert out[0::2] == [f'# {name}' for name in names]
  lines = sweep.print_commands(slurm_runs(root), 'configs/tiny.py', {'train.steps': 30}, 'python')
  for command, line in zip(out[1::2], lines):
    argv = shlex.split(command)
    assert argv[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-a', '--zone=us-central2-b', '--worker=all']
    assert argv[8] == f'--command=cd perijax && {line}'
    remote = shlex.split(argv[8][len('--command='):])   # as the worker's shell reads it
    assert remote[:6] == ['cd', 'perijax', '&&', 'python', '-m', 'perijax.train'] and remote.count('&&') == 2
  assert not root.exists()


@pytest.mark.parametrize('args, message', [
    (['--launcher=tpu_vm'], '--launcher=tpu_vm needs --tpu=NAME and --zone=ZONE'),
    (['--launcher=slurm', '--print'], 'give --print or --launcher=slurm, not both'),
    (['--submit'], '--submit submits a SLURM script; it needs --launcher=slurm'),
    (['--launcher=slurm', '--time=soon'], "--time='soon': expected a SLURM time limit"),
])
def test_cli_bad_launch_flags_fail_in_one_line_and_write_nothing(tmp_path, args, message):
  result = run_sweep_cli(tmp_path / 'r', *args, expect=1)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'perijax.sweep: error: {message}')
  assert not (tmp_path / 'r').exists()
