"""The sweep: grid × seeds expansion, typed overrides, clear errors, resumption and failure handling (no training);
its cluster launch: the SLURM array script (as text, `bash -n`, and run task by task with a stand-in Python) and
submission through a stand-in sbatch, the TPU pod `gcloud` commands, and bad launcher flags."""

import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys

import pytest

from perijax import config as config_lib
from perijax import sweep
from perijax.errors import ArgumentError

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(REPO / 'configs' / 'default.py')
GRID = ['model.norm.placement=pre,peri,post', 'optimizer.lr=1e-3,3e-3']


@pytest.fixture(scope='module')
def config():
  return config_lib.load_file(DEFAULT_CONFIG)


def test_grid_times_seeds_gives_18_runs_with_seed_per_run(config):
  runs = sweep.expand_grid(config, GRID, seeds=3, root='/sweeps/a')
  assert len(runs) == 18
  combos = {(r.overrides['model.norm.placement'], r.overrides['optimizer.lr'], r.overrides['train.seed'])
            for r in runs}
  assert combos == {(p, lr, s) for p in ('pre', 'peri', 'post') for lr in (1e-3, 3e-3) for s in (0, 1, 2)}
  assert len({r.workdir for r in runs}) == 18
  run = next(r for r in runs if r.overrides == {'model.norm.placement': 'peri', 'optimizer.lr': 0.001,
                                                 'train.seed': 1})
  assert run.name == 'placement=peri,lr=0.001,seed=1'
  assert run.workdir == os.path.join('/sweeps/a', 'placement=peri,lr=0.001,seed=1')
  assert run.steps == config.train.steps


def test_override_values_are_typed_like_the_config_field(config):
  runs = sweep.expand_grid(config, ['train.steps=5,7', 'optimizer.grad_clip=1', 'model.tie_embeddings=false',
                                    'model.norm.kind=layernorm'], seeds=1, root='r')
  assert [r.steps for r in runs] == [5, 7]
  first = runs[0].overrides
  assert type(first['train.steps']) is int
  assert type(first['optimizer.grad_clip']) is float and first['optimizer.grad_clip'] == 1.0
  assert first['model.tie_embeddings'] is False
  assert first['model.norm.kind'] == 'layernorm'
  assert type(first['train.seed']) is int


def test_tuple_field_values_split_outside_brackets(config):
  field, values = sweep.parse_sweep(config, "eval.tasks=('next_line',),('next_line','piqa')")
  assert field == 'eval.tasks'
  assert values == [('next_line',), ('next_line', 'piqa')]


@pytest.mark.parametrize('spec, message', [
    ('model.norm.placment=pre,peri', "no field 'model.norm.placment'; did you mean model.norm.placement"),
    ('lr=1e-3', 'did you mean optimizer.lr'),
    ('train.steps=1.5', 'train.steps='),
    ('model.tie_embeddings=maybe', 'not a valid bool'),
    ('optimizer.lr', 'expected FIELD=VALUE'),
    ('optimizer.lr=1e-3,,3e-3', 'empty value'),
    ('optimizer.lr=1e-3,0.001', 'repeated'),
])
def test_bad_sweep_is_one_clear_error_before_anything_runs(config, tmp_path, spec, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('.', r'\.')):
    sweep.expand_grid(config, [spec], seeds=1, root=str(tmp_path / 'root'))
  assert not (tmp_path / 'root').exists()


def test_seed_swept_twice_or_with_seeds_is_rejected(config):
  with pytest.raises(ValueError, match='swept twice'):
    sweep.expand_grid(config, ['optimizer.lr=1e-3', 'optimizer.lr=3e-3'], seeds=1, root='r')
  with pytest.raises(ValueError, match='use one or the other'):
    sweep.expand_grid(config, ['train.seed=4,5'], seeds=2, root='r')
  assert [r.name for r in sweep.expand_grid(config, ['train.seed=4,5'], seeds=1, root='r')] == ['seed=4', 'seed=5']


@pytest.mark.parametrize('sweeps, seeds', [([], 1), ([], 3), (['train.seed=4,5'], 1)])
def test_a_fixed_seed_is_rejected_since_the_sweep_sets_the_seed_itself(config, sweeps, seeds):
  # train_command merges each run's seed over the fixed overrides: --config.train.seed=7 would silently run seed 0.
  with pytest.raises(ArgumentError, match=r'--config\.train\.seed=7 .*--sweep=train\.seed=7.*--seeds=N'):
    sweep.expand_grid(config, sweeps, seeds=seeds, root='r', fixed_overrides={'train.seed': 7, 'train.steps': 5})


def test_cli_fixed_seed_fails_in_one_line_before_any_run(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'perijax.sweep', '--config=configs/tiny.py', '--config.train.seed=7', '--seeds=1',
       f'--root={tmp_path / "r"}', '--print'], cwd=REPO, capture_output=True, text=True)   # --print: trains nothing
  assert result.returncode == 1
  assert result.stderr.count('\n') == 1 and 'perijax.sweep: error: --config.train.seed=7' in result.stderr
  assert not (tmp_path / 'r').exists()


def test_short_names_are_unique_suffixes():
  assert sweep.short_names(['model.norm.eps', 'optimizer.eps', 'optimizer.lr', 'train.seed']) == {
      'model.norm.eps': 'norm.eps', 'optimizer.eps': 'optimizer.eps', 'optimizer.lr': 'lr', 'train.seed': 'seed'}


def test_missing_config_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"nope.py' is not a file; expected a Python file with get_config\(\)"):
    config_lib.load_file(str(tmp_path / 'nope.py') + ':arg')


class FakeTrainer:
  """Stands in for perijax.train / perijax.evaluate: writes the checkpoint and eval files they would write."""

  def __init__(self, fail_lr=None, stop_early_at=None):
    self.calls = []
    self.fail_lr = fail_lr
    self.stop_early_at = stop_early_at

  def __call__(self, argv, log_path):
    self.calls.append(list(argv))
    args = dict(a[2:].split('=', 1) for a in argv if a.startswith('--') and '=' in a)
    workdir = args['workdir']
    if argv[2] == 'perijax.train':
      if self.fail_lr is not None and float(args['config.optimizer.lr']) == self.fail_lr:
        return 1
      steps = int(args.get('config.train.steps', 200))
      final = self.stop_early_at or steps
      os.makedirs(os.path.join(workdir, 'checkpoints', str(final)), exist_ok=True)
      os.makedirs(os.path.join(workdir, 'checkpoints', f'{final + 1}.orbax-checkpoint-tmp-1'), exist_ok=True)
      return 0
    os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
    with open(os.path.join(workdir, 'eval', f'step_{args["step"]}.json'), 'w') as f:
      json.dump({'step': int(args['step']), 'loss': 1.0}, f)
    return 0


def test_run_sweep_trains_evaluates_and_skips_finished_runs(config, tmp_path):
  root = str(tmp_path / 'sweep')
  runs = sweep.expand_grid(config, ['model.norm.placement=pre,peri'], seeds=2, root=root,
                           fixed_overrides={'train.steps': 30})
  trainer = FakeTrainer()
  sweep.run_sweep(runs, root, DEFAULT_CONFIG, {'train.steps': 30}, python='py', run_command=trainer, log=lambda _: None)
  assert [r.status for r in runs] == ['finished'] * 4
  assert len(trainer.calls) == 8   # a train and an evaluate per run
  train_argv = trainer.calls[0]
  assert train_argv[:3] == ['py', '-m', 'perijax.train']
  assert f'--config={DEFAULT_CONFIG}' in train_argv and '--config.train.steps=30' in train_argv
  assert '--config.model.norm.placement=pre' in train_argv and '--config.train.seed=0' in train_argv
  assert trainer.calls[1] == ['py', '-m', 'perijax.evaluate', f'--workdir={runs[0].workdir}', '--step=30']
  recorded = json.loads(pathlib.Path(root, 'sweep.json').read_text())
  assert [r['name'] for r in recorded['runs']] == [r.name for r in runs]
  assert recorded['runs'][1]['overrides'] == {'model.norm.placement': 'pre', 'train.seed': 1}

  # Second pass: one run lost its eval file (killed during evaluation); only that one is evaluated again.
  os.remove(os.path.join(runs[2].workdir, 'eval', 'step_30.json'))
  again = sweep.expand_grid(config, ['model.norm.placement=pre,peri'], seeds=2, root=root,
                            fixed_overrides={'train.steps': 30})
  trainer2 = FakeTrainer()
  sweep.run_sweep(again, root, DEFAULT_CONFIG, {'train.steps': 30}, python='py', run_command=trainer2,
                  log=lambda _: None)
  assert [r.status for r in again] == ['skipped', 'skipped', 'finished', 'skipped']
  assert [c[2] for c in trainer2.calls] == ['perijax.evaluate']   # trained to the end: no need to train again


def test_unfinished_run_is_trained_again_so_the_trainer_resumes(config, tmp_path):
  root = str(tmp_path / 'sweep')
  runs = sweep.expand_grid(config, [], seeds=1, root=root, fixed_overrides={'train.steps': 30})
  os.makedirs(os.path.join(runs[0].workdir, 'checkpoints', '10'))   # killed at step 10
  trainer = FakeTrainer()
  sweep.run_sweep(runs, root, DEFAULT_CONFIG, {'train.steps': 30}, run_command=trainer, log=lambda _: None)
  assert [c[2] for c in trainer.calls] == ['perijax.train', 'perijax.evaluate']
  assert runs[0].status == 'finished'


def test_without_evaluate_runs_are_trained_only_and_trained_ones_skipped(config, tmp_path):
  root = str(tmp_path / 'sweep')
  runs = sweep.expand_grid(config, ['model.norm.placement=pre,peri'], seeds=1, root=root,
                           fixed_overrides={'train.steps': 30})
  os.makedirs(os.path.join(runs[1].workdir, 'checkpoints', '30'))   # trained to the end, never evaluated
  trainer = FakeTrainer()
  sweep.run_sweep(runs, root, DEFAULT_CONFIG, {'train.steps': 30}, run_command=trainer, log=lambda _: None,
                  evaluate=False)
  assert [c[2] for c in trainer.calls] == ['perijax.train'] and trainer.calls[0][3:5] == [
      f'--config={DEFAULT_CONFIG}', f'--workdir={runs[0].workdir}']
  assert [r.status for r in runs] == ['finished', 'skipped']
  stopped = sweep.expand_grid(config, [], seeds=1, root=str(tmp_path / 'stopped'), fixed_overrides={'train.steps': 30})
  sweep.run_sweep(stopped, str(tmp_path / 'stopped'), DEFAULT_CONFIG, {'train.steps': 30},
                  run_command=FakeTrainer(stop_early_at=12), log=lambda _: None, evaluate=False)
  assert stopped[0].status == 'ended_early' and 'step 12 of 30' in stopped[0].detail


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(config, tmp_path):
  root = str(tmp_path / 'sweep')
  runs = sweep.expand_grid(config, ['optimizer.lr=1e-3,3e-1'], seeds=1, root=root, fixed_overrides={'train.steps': 8})
  messages = []
  sweep.run_sweep(runs, root, DEFAULT_CONFIG, {'train.steps': 8}, run_command=FakeTrainer(fail_lr=0.3),
                  log=messages.append)
  assert [r.status for r in runs] == ['finished', 'failed']
  assert 'exited with 1' in runs[1].detail
  assert '1 failed' in messages[-1] and 'lr=0.3' in messages[-1]
  recorded = json.loads(pathlib.Path(root, 'sweep.json').read_text())
  assert [r['status'] for r in recorded['runs']] == ['finished', 'failed']


def test_run_that_stopped_early_is_evaluated_at_its_last_checkpoint(config, tmp_path):
  root = str(tmp_path / 'sweep')
  runs = sweep.expand_grid(config, [], seeds=1, root=root, fixed_overrides={'train.steps': 30})
  trainer = FakeTrainer(stop_early_at=12)
  sweep.run_sweep(runs, root, DEFAULT_CONFIG, {'train.steps': 30}, run_command=trainer, log=lambda _: None)
  assert trainer.calls[-1][-1] == '--step=12'
  assert runs[0].status == 'ended_early'


def test_cli_print_emits_one_quoted_line_per_run_and_writes_nothing(tmp_path):
  root = tmp_path / 'sweep root'
  out = subprocess.run(
      [sys.executable, '-m', 'perijax.sweep', '--config=configs/tiny.py', *[f'--sweep={g}' for g in GRID],
       '--seeds=3', f'--root={root}', '--print', '--config.train.steps=50'],
      cwd=REPO, capture_output=True, text=True, check=True).stdout.strip().splitlines()
  assert len(out) == 18
  train, evaluate = out[0].split(' && ')
  train_argv = shlex.split(train)
  assert train_argv[1:4] == ['-m', 'perijax.train', '--config=configs/tiny.py']
  assert f'--workdir={root}/placement=pre,lr=0.001,seed=0' in train_argv
  assert '--config.train.steps=50' in train_argv and '--config.optimizer.lr=0.001' in train_argv
  assert shlex.split(evaluate)[-1] == '--step=50'
  assert not root.exists()


def test_cli_typo_fails_before_any_run(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'perijax.sweep', f'--config={DEFAULT_CONFIG}', '--sweep=model.norm.placment=pre',
       f'--root={tmp_path / "r"}'], cwd=REPO, capture_output=True, text=True)
  assert result.returncode != 0
  assert "no field 'model.norm.placment'; did you mean model.norm.placement?" in result.stderr
  assert not (tmp_path / 'r').exists()


def test_config_validation_rejects_a_bad_value_before_any_run(config):
  seen = []

  def validate(resolved):
    seen.append((resolved.model.norm.placement, resolved.train.seed, resolved.train.steps))
    if resolved.model.norm.placement == 'peri2':
      raise ValueError("config.model.norm.placement = 'peri2' is not allowed")

  with pytest.raises(ValueError, match=r"run placement=peri2,seed=0: .*'peri2' is not allowed"):
    sweep.expand_grid(config, ['model.norm.placement=pre,peri2'], seeds=1, root='r',
                      fixed_overrides={'train.steps': 9}, validate=validate)
  assert seen == [('pre', 0, 9), ('peri2', 0, 9)]   # each run's resolved config, overrides applied
  assert config.model.norm.placement == 'pre' and config.train.steps != 9   # the loaded config is untouched


def test_the_project_validator_catches_an_unknown_placement(config):
  with pytest.raises(ValueError, match='peri2'):
    sweep.expand_grid(config, ['model.norm.placement=peri,peri2'], seeds=1, root='r', validate=config_lib.validate)


def test_config_argument_after_colon_is_used_and_passed_through_untouched(tmp_path):
  config_file = tmp_path / 'variants.py'
  config_file.write_text(
      'import ml_collections\n'
      'def get_config(arg):\n'
      '  config = ml_collections.ConfigDict()\n'
      '  config.train = ml_collections.ConfigDict({"steps": 7 if arg == "short" else 70, "seed": 0})\n'
      '  return config\n')
  config_arg = f'{config_file}:short'
  config = config_lib.load_file(config_arg)
  runs = sweep.expand_grid(config, [], seeds=2, root='r')
  assert [r.steps for r in runs] == [7, 7]
  line = sweep.print_commands(runs, config_arg, {}, 'python')[1]
  assert f'--config={config_arg}' in shlex.split(line.split(' && ')[0])
  assert line.endswith('--step=7')


# ---- cluster launch ----

LAUNCH_GRID = ['--sweep=model.norm.placement=pre,peri', '--seeds=2']


def executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def run_sweep_cli(root, *args, path_dirs=(), expect=0):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PATH': os.pathsep.join([*map(str, path_dirs), os.environ['PATH']])}
  result = subprocess.run([sys.executable, '-m', 'perijax.sweep', '--config=configs/tiny.py', *LAUNCH_GRID,
                           f'--root={root}', '--config.train.steps=30', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
  assert result.returncode == expect, result.stderr
  return result


def slurm_runs(root):
  config = config_lib.load_file(str(REPO / 'configs' / 'tiny.py'))
  return sweep.expand_grid(config, ['model.norm.placement=pre,peri'], seeds=2, root=str(root),
                           fixed_overrides={'train.steps': 30})


def test_slurm_script_runs_the_print_line_of_its_array_task(tmp_path):
  runs = slurm_runs(tmp_path / 'sweep')
  lines = sweep.print_commands(runs, 'configs/tiny.py', {'train.steps': 30}, str(tmp_path / 'py'))
  script = sweep.slurm_script(lines, [r.name for r in runs], root=str(tmp_path / 'sweep'), job_name='perijax-x',
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
    ({'time': 'soon'}, "--time='soon'"), ({'options': ['account=x']}, 'one sbatch option'),
])
def test_bad_slurm_flag_is_one_clear_error(kwargs, message):
  with pytest.raises(ArgumentError, match=message):
    sweep.slurm_script(['true'], ['run'], root='r', job_name='j', chdir='.', **kwargs)


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
    (['--launcher=slurm', '--gpus=-1'], 'flag --gpus=-1: -1 is not'),
])
def test_cli_bad_launch_flags_fail_in_one_line_and_write_nothing(tmp_path, args, message):
  result = run_sweep_cli(tmp_path / 'r', *args, expect=1)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'perijax.sweep: error: {message}')
  assert not (tmp_path / 'r').exists()
