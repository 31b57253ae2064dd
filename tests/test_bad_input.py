"""Every class of bad input to every command: exit status 1, exactly one `perijax.<tool>: error:` line naming the
problem, no traceback, and every file already in the workdir unchanged. Damaged checkpoints are never resumed or
evaluated; the newest intact one is named and can be resumed from.

One tiny trained run (checkpoints at steps 2 and 4) is shared; cases that damage it get their own copy. The commands
run as subprocesses, several at a time.
"""

import concurrent.futures
import glob
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from perijax import checkpoint as checkpoint_lib
from perijax import cli
from perijax import config as config_lib
from perijax import evaluate
from perijax import train as train_lib
from perijax.errors import ArgumentError

REPO = pathlib.Path(__file__).resolve().parent.parent
SMALL = ['--config.train.batch_size=8', '--config.train.seq_len=32', '--config.model.d_model=32',
         '--config.model.num_layers=2', '--config.checkpoint.every=2', '--config.train.log_every=2',
         '--config.optimizer.warmup_steps=1', '--config.train.stats_every=1']
CASES = {}   # name -> (tool, setup(ctx) -> (argv, directory that must stay unchanged), pattern of the error line)


def case(name, tool, pattern):
  def register(setup):
    CASES[name] = (tool, setup, pattern)
    return setup
  return register


def train_args(ctx, workdir=None, *more):
  return [f'--workdir={workdir or ctx.run}', '--config=configs/tiny.py', f'--config.data.data_dir={ctx.data_dir}',
          '--config.train.steps=6', *SMALL, *more]


def damaged_copy(ctx, name, damage):
  """A copy of the trained run with `damage(step 4's largest array file)` applied."""
  copy = ctx.tmp / name
  shutil.copytree(ctx.run, copy)
  files = glob.glob(str(copy / 'checkpoints' / '4' / 'state' / 'ocdbt.process_*' / 'd' / '*'))
  damage(max(files, key=os.path.getsize))
  return copy


def flip_a_byte(path):
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(16)


# ---- config ----
case('config_unknown_field', 'train', r"config has no field 'model.d_modle'; did you mean model.d_model")(
    lambda ctx: (train_args(ctx, None, '--config.model.d_modle=64'), ctx.run))
case('config_wrong_type', 'train', r"train.steps='ten': not a valid int")(
    lambda ctx: (train_args(ctx, None, '--config.train.steps=ten'), ctx.run))
case('config_out_of_range', 'params', r'config.optimizer.lr = -1.0 is not allowed: expected a positive number')(
    lambda ctx: (['--config=configs/tiny.py', '--config.optimizer.lr=-1'], ctx.run))
case('config_not_dividing', 'train', r'd_model = 32 is not allowed: expected a multiple of model.num_heads = 3')(
    lambda ctx: (train_args(ctx, None, '--config.model.num_heads=3'), ctx.run))
case('batch_not_dividing_the_mesh', 'train', r'batch of 12 sequences .* not divisible by data x fsdp = 8')(
    lambda ctx: (train_args(ctx, None, '--config.train.batch_size=12'), ctx.run))
case('config_file_missing', 'train', r"--config=no_such_config.py: 'no_such_config.py' is not a file")(
    lambda ctx: ([f'--workdir={ctx.run}', '--config=no_such_config.py'], ctx.run))
case('config_file_broken', 'params', r'cannot be loaded \(SyntaxError')(
    lambda ctx: ([f'--config={ctx.write("broken.py", "def get_config(:")}'], ctx.run))
case('config_file_without_get_config', 'params', r"cannot be loaded \(AttributeError.*get_config")(
    lambda ctx: ([f'--config={ctx.write("noget.py", "x = 1")}'], ctx.run))
# ---- flags ----
case('flag_unknown', 'train', r"Unknown command line flag 'bogus'")(
    lambda ctx: (train_args(ctx, None, '--bogus=1'), ctx.run))
case('flag_missing', 'train', r'--workdir is required')(
    lambda ctx: (train_args(ctx)[1:], ctx.run))
case('override_without_value', 'train', r'--config.train.steps: expected --config.<section>.<field>=<value>')(
    lambda ctx: (train_args(ctx, None, '--config.train.steps'), ctx.run))
# ---- workdirs ----
case('workdir_is_a_file', 'train', r'--workdir=.*config.json is a file; expected a directory')(
    lambda ctx: (train_args(ctx, ctx.run / 'config.json'), ctx.run))
case('workdir_read_only', 'train', r'--workdir=.* is not writable')(
    lambda ctx: (train_args(ctx, ctx.read_only_dir()), ctx.run))
case('evaluate_workdir_not_a_run', 'evaluate', r'config.json does not exist: .* is not a perijax training workdir')(
    lambda ctx: ([f'--workdir={ctx.tmp}'], ctx.run))
# ---- checkpoints ----
case('checkpoint_truncated', 'train', r'checkpoint 4 at .*checkpoints/4 is damaged: state/.* has 16 bytes, .*'
     r'the newest intact one is step 2; rerun with --resume_from_intact')(
    lambda ctx: (lambda copy: (train_args(ctx, copy), copy))(damaged_copy(ctx, 'truncated', truncate)))
case('checkpoint_flipped_bytes', 'evaluate', r'checkpoint 4 at .* is damaged: .* changed since the save')(
    lambda ctx: (lambda copy: ([f'--workdir={copy}'], copy))(damaged_copy(ctx, 'flipped', flip_a_byte)))
case('checkpoint_missing_file', 'train', r'checkpoint 4 at .* is damaged: state/.* is missing')(
    lambda ctx: (lambda copy: (train_args(ctx, copy), copy))(damaged_copy(ctx, 'missing', os.remove)))
case('checkpoint_of_another_model_shape', 'train', r'checkpoint 4 in .* does not match this config')(
    lambda ctx: (train_args(ctx, None, '--config.model.d_model=64'), ctx.run))
# ---- data ----
case('tfds_name_unknown', 'train', r"data.name 'no_such_dataset' is not a TFDS dataset")(
    lambda ctx: (train_args(ctx, None, '--config.data.name=no_such_dataset'), ctx.run))
case('data_dir_missing', 'train', r"not prepared as array_record in data dir '/nonexistent/tfds'")(
    lambda ctx: (train_args(ctx, None, '--config.data.data_dir=/nonexistent/tfds'), ctx.run))
case('text_field_wrong', 'train', r"data.text_field 'content' is not a feature")(
    lambda ctx: (train_args(ctx, None, '--config.data.text_field=content'), ctx.run))
case('split_wrong', 'train', r"Split 'dev' of 'shakespeare_milton': Unknown split")(
    lambda ctx: (train_args(ctx, None, '--config.data.train_split=dev'), ctx.run))
case('tokenizer_file_missing', 'train', r'SentencePiece model file /nonexistent.model does not exist')(
    lambda ctx: (train_args(ctx, None, '--config.data.tokenizer=sentencepiece',
                            '--config.data.tokenizer_path=/nonexistent.model'), ctx.run))
case('tokenizer_file_broken', 'train', r'is not a readable SentencePiece model')(
    lambda ctx: (train_args(ctx, None, '--config.data.tokenizer=sentencepiece',
                            f'--config.data.tokenizer_path={ctx.write("junk.model", "not a model")}'), ctx.run))
case('corpus_sdist_missing', 'data.corpus', r'sdist /nonexistent.tar.gz does not exist')(
    lambda ctx: (['--sdist=/nonexistent.tar.gz', f'--data_dir={ctx.tmp / "corpus"}'], ctx.run))
# ---- sweep, dryrun, report ----
case('sweep_no_seeds', 'sweep', r'--seeds=0: need at least 1 seed')(
    lambda ctx: (['--config=configs/tiny.py', f'--root={ctx.tmp / "sweep"}', '--seeds=0', '--print'], ctx.run))
case('sweep_without_values', 'sweep', r"--sweep='model.norm.placement': expected FIELD=VALUE")(
    lambda ctx: (['--config=configs/tiny.py', f'--root={ctx.tmp / "sweep"}', '--sweep=model.norm.placement',
                  '--print'], ctx.run))
case('dryrun_zero_devices', 'dryrun', r'flag --devices=0: 0 is not a positive integer')(
    lambda ctx: (['--config=configs/tiny.py', '--devices=0'], ctx.run))
case('dryrun_bad_mfu', 'dryrun', r'--mfu=2.0: expected a fraction in \(0, 1\]')(
    lambda ctx: (['--config=configs/tiny.py', '--devices=8', '--mfu=2'], ctx.run))
case('report_not_a_run', 'report', r'is not a directory; expected a run workdir or a sweep root')(
    lambda ctx: ([str(ctx.tmp / 'nowhere')], ctx.run))


def hashes(directory):
  return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(pathlib.Path(directory).rglob('*')) if path.is_file()}


class Context:
  def __init__(self, run, data_dir, tmp):
    self.run, self.data_dir, self.tmp = run, data_dir, tmp

  def write(self, name, text):
    (self.tmp / name).write_text(text)
    return self.tmp / name

  def read_only_dir(self):
    return read_only_dir(self.tmp)


def read_only_dir(parent):
  """A directory this user cannot write in: `parent`/read_only, mode 0o555."""
  if os.geteuid() == 0:  # root writes through permission bits: a read-only file system instead
    return pathlib.Path('/sys/kernel')
  directory = parent / 'read_only'
  directory.mkdir(exist_ok=True)
  directory.chmod(0o555)
  return directory


def test_an_object_store_workdir_is_not_probed_in_the_current_directory(tmp_path, monkeypatch):
  # 'gs://bucket/run' is no local path: made absolute, it fell under the current directory, read-only here.
  monkeypatch.chdir(read_only_dir(tmp_path))
  with pytest.raises(ArgumentError, match='--workdir=run is not writable'):   # the cwd is read-only indeed
    cli.check_writable_dir('run')
  cli.check_writable_dir('gs://bucket/run')


@pytest.fixture(scope='module')
def trained(tmp_path_factory, corpus_data_dir):
  """A tiny run: checkpoints at steps 2 and 4, loaded by the commands' own loader from the same flags."""
  run = tmp_path_factory.mktemp('bad_input') / 'run'
  overrides = [f'--config.data.data_dir={corpus_data_dir}', '--config.train.steps=4', *SMALL]
  train_lib.train(config_lib.load(str(REPO / 'configs' / 'tiny.py'), overrides), str(run))
  return run


@pytest.fixture(scope='module')
def outcomes(trained, corpus_data_dir, tmp_path_factory):
  """{case: (process, directory, hashes before, hashes after)}: every case run once, four at a time."""
  ctx = Context(trained, corpus_data_dir, tmp_path_factory.mktemp('cases'))
  prepared = {name: (tool, *setup(ctx)) for name, (tool, setup, _) in CASES.items()}
  before = {name: hashes(directory) for name, (_, _, directory) in prepared.items()}
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), TQDM_DISABLE='1')

  def launch(name):
    tool, argv, _ = prepared[name]
    return subprocess.run([sys.executable, '-m', f'perijax.{tool}', *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    processes = dict(zip(prepared, pool.map(launch, prepared)))
  return {name: (processes[name], prepared[name][2], before[name], hashes(prepared[name][2])) for name in prepared}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_bad_input_is_one_line_exit_1_and_nothing_changes(outcomes, name):
  tool, _, pattern = CASES[name]
  process, directory, before, after = outcomes[name]
  assert process.returncode == 1, process.stderr[-3000:]
  assert 'Traceback' not in process.stderr, process.stderr[-3000:]
  # XLA's C++ logging and absl warnings may add lines of their own; perijax's is exactly one, and the last.
  errors = [line for line in process.stderr.splitlines() if ': error: ' in line]
  assert len(errors) == 1 and process.stderr.rstrip().endswith(errors[0]), process.stderr[-3000:]
  assert errors[0].startswith(f'perijax.{tool}: error: ') and re.search(pattern, errors[0]), errors[0]
  assert after == before, f'{directory} changed'


def test_resume_from_intact_sets_the_damaged_step_aside_and_an_unfinished_one_by_itself(trained, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(trained, damaged)
  flip_a_byte(max(glob.glob(str(damaged / 'checkpoints' / '4' / 'state' / '**' / 'd' / '*'), recursive=True),
                  key=os.path.getsize))
  manager = checkpoint_lib.make_manager(str(damaged))
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match='newest intact one is step 2'):
    checkpoint_lib.resume_step(manager, str(damaged))
  assert checkpoint_lib.resume_step(manager, str(damaged), resume_from_intact=True) == 2
  assert manager.all_steps() == [2] and (damaged / 'checkpoints_damaged' / '4' / 'state').is_dir()

  unfinished = tmp_path / 'unfinished'  # renamed into place, killed before its checksums were written
  shutil.copytree(trained, unfinished)
  (unfinished / 'checkpoints' / '4' / checkpoint_lib.MANIFEST).unlink()
  manager = checkpoint_lib.make_manager(str(unfinished))
  assert checkpoint_lib.resume_step(manager, str(unfinished)) == 2
  assert (unfinished / 'checkpoints_damaged' / '4').is_dir()


@pytest.mark.parametrize('process_index', (0, 1))
def test_with_several_processes_only_process_0_reads_the_checkpoints_and_all_take_its_verdict(
    trained, tmp_path, monkeypatch, process_index):
  damaged = tmp_path / 'damaged'
  shutil.copytree(trained, damaged)
  flip_a_byte(max(glob.glob(str(damaged / 'checkpoints' / '4' / 'state' / '**' / 'd' / '*'), recursive=True),
                  key=os.path.getsize))
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  verified, broadcast, synced = [], [], []
  real_verify = checkpoint_lib.verify
  monkeypatch.setattr(checkpoint_lib, 'verify', lambda *args: (verified.append(args[1]), real_verify(*args)))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: process_index)
  process_0_verdict = [2, 1, 1]  # what process 0 finds here: step 2 intact, step 4 set aside, a damaged step
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', lambda values: (broadcast.append(values.tolist()),
                                                                               np.array(process_0_verdict))[1])
  monkeypatch.setattr(multihost_utils, 'sync_global_devices', synced.append)
  manager = checkpoint_lib.make_manager(str(damaged))
  message = 'checkpoints/4 is damaged' if process_index == 0 else 'process 0 found a damaged checkpoint'
  with pytest.raises(checkpoint_lib.DamagedCheckpointError, match=f'{message}.*newest intact one is step 2'):
    checkpoint_lib.resume_step(manager, str(damaged))
  assert checkpoint_lib.resume_step(manager, str(damaged), resume_from_intact=True) == 2
  assert verified == ([4, 2] * 2 if process_index == 0 else [])  # process 1 reads no checkpoint file
  assert broadcast == [process_0_verdict if process_index == 0 else [-1, 0, 0]] * 2
  assert synced.count('perijax_checkpoints_set_aside') == 1  # every process waits for process 0's moves
  assert (damaged / 'checkpoints_damaged' / '4').is_dir() == (process_index == 0)  # only process 0 moves


def test_every_file_of_a_checkpoint_is_checksummed(trained):
  step_dir = trained / 'checkpoints' / '4'
  recorded = set(__import__('json').loads((step_dir / checkpoint_lib.MANIFEST).read_text())['files'])
  arrays = {str(p.relative_to(step_dir)) for p in step_dir.rglob('*') if p.is_file() and '/d/' in str(p)}
  assert arrays and arrays <= recorded
  for step in (2, 4):
    checkpoint_lib.verify(trained / 'checkpoints', step)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ('all', 'watch'))
def test_evaluate_all_and_watch_skip_a_damaged_checkpoint_and_go_on(trained, tmp_path, capsys, mode):
  copy = tmp_path / 'run'
  shutil.copytree(trained, copy)
  flip_a_byte(max(glob.glob(str(copy / 'checkpoints' / '2' / 'state' / '**' / 'd' / '*'), recursive=True),
                  key=os.path.getsize))
  results = evaluate.run(str(copy), evaluate_all=mode == 'all', watch=mode == 'watch', poll_seconds=0.1,
                         timeout_seconds=60, overrides=['--config.eval.tasks=', '--config.data.eval_max_batches=1'])
  assert [r['step'] for r in results] == [4]  # step 4 is config.train.steps: --watch stops after it
  assert re.search(r'skipped: checkpoint 2 at .* is damaged: state/.*checksum mismatch', capsys.readouterr().out)
  assert not (copy / 'eval' / 'step_2.json').exists()
