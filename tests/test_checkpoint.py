"""Checkpoints a pod can trust: exact resume after SIGKILL, SIGTERM saves and exits, restore onto any mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from perijax import checkpoint as checkpoint_lib
from perijax import config as config_lib
from perijax import optimizer as optimizer_lib
from perijax import sharding as sharding_lib
from perijax import train as train_lib
from perijax import train_step as train_step_lib
from perijax.data import tokenizers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = dict(d_model=32, num_layers=2)


def small_config(data_dir, steps):
  config = tiny.get_config()
  config.model.update(**OVERRIDES)
  # stats_every=1: every step collects the statistics, so one program compiles (the final step always collects them)
  config.train.update(steps=steps, batch_size=8, seq_len=32, log_every=1, stats_every=1)
  config.optimizer.warmup_steps = 2
  config.data.data_dir = data_dir
  config.checkpoint.update(every=3, keep=5)
  return config


def restore_state(config, workdir, step, devices=None):
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.logical_rules(config.mesh)):
    abstract, shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
    manager = checkpoint_lib.make_manager(workdir, read_only=True)
    return checkpoint_lib.restore(manager, step, abstract, shardings), model, mesh


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


# Runs perijax.train in a child process that SIGKILLs itself right after the step-3 checkpoint is complete.
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from perijax import checkpoint, train
save = checkpoint.save
def save_then_die(manager, step, *args, **kwargs):
  save(manager, step, *args, **kwargs)
  if step == 3:
    manager.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save_then_die
sys.argv = ['perijax.train'] + sys.argv[1:]
train.define_flags()
from perijax import cli
cli.run(train.main)
"""

# The same, but SIGKILLed while the asynchronous save of step 6 is in flight: Orbax has written the arrays in the
# background and calls back to have the checksums written; the process dies right there, before the step is complete.
KILL_DURING_ASYNC_SAVE = """
import os, signal, sys
from perijax import checkpoint, cli, train
write_manifest = checkpoint.write_manifest
def die_at_step_6(step_dir):
  if os.path.basename(step_dir).split('.')[0] == '6':
    os.kill(os.getpid(), signal.SIGKILL)
  write_manifest(step_dir)
checkpoint.write_manifest = die_at_step_6
sys.argv = ['perijax.train'] + sys.argv[1:]
train.define_flags()
cli.run(train.main)
"""


def cli_args(data_dir, workdir, steps):
  args = [f'--workdir={workdir}', '--config=configs/tiny.py', f'--config.data.data_dir={data_dir}',
          f'--config.train.steps={steps}', '--config.train.batch_size=8', '--config.train.seq_len=32',
          '--config.train.log_every=1', '--config.train.stats_every=1', '--config.optimizer.warmup_steps=2',
          '--config.checkpoint.every=3', '--config.checkpoint.keep=5']
  return args + [f'--config.model.{k}={v}' for k, v in OVERRIDES.items()]


@pytest.mark.slow
def test_killed_run_resumes_bit_for_bit(corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir, steps=6)
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  train_lib.train(config, straight)

  child = subprocess.run([sys.executable, '-c', KILL_AFTER_CHECKPOINT, *cli_args(corpus_data_dir, killed, 6)],
                         cwd=REPO, capture_output=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
  assert checkpoint_lib.make_manager(killed, read_only=True).all_steps() == [3]
  train_lib.train(config, killed)  # picks up the step-3 checkpoint by itself

  expected, _, _ = restore_state(config, straight, 6)
  got, _, _ = restore_state(config, killed, 6)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected), jax.device_get(got))
  # The same examples were consumed: identical data-iterator positions and identical per-step losses.
  data_state = lambda workdir: open(os.path.join(workdir, 'checkpoints', '6', 'data',
                                                 'process_0-of-1.json')).read()
  assert data_state(straight) == data_state(killed)
  assert [losses(straight)[s] for s in (4, 5, 6)] == [losses(killed)[s] for s in (4, 5, 6)]


@pytest.mark.slow
def test_kill_during_an_async_save_resumes_from_the_previous_checkpoint_bit_for_bit(corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir, steps=9)
  config.checkpoint.async_save = True
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  train_lib.train(config, straight)
  args = cli_args(corpus_data_dir, killed, 9) + ['--config.checkpoint.async_save=true']
  child = subprocess.run([sys.executable, '-c', KILL_DURING_ASYNC_SAVE, *args], cwd=REPO, capture_output=True,
                         env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600)
  assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
  manager = checkpoint_lib.make_manager(killed, read_only=True)
  assert checkpoint_lib.resume_step(manager, killed) == 3  # step 6 never became a checkpoint
  train_lib.train(config, killed)
  for step in (3, 9):
    checkpoint_lib.verify(checkpoint_lib.checkpoint_dir(killed), step)
  expected, _, _ = restore_state(config, straight, 9)
  got, _, _ = restore_state(config, killed, 9)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(expected), jax.device_get(got))
  assert [losses(straight)[s] for s in range(4, 10)] == [losses(killed)[s] for s in range(4, 10)]


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_exits_cleanly(corpus_data_dir, tmp_path):
  workdir = str(tmp_path / 'preempted')
  args = cli_args(corpus_data_dir, workdir, 100_000)
  child = subprocess.Popen([sys.executable, '-m', 'perijax.train', *args], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 5):
    time.sleep(0.2)
  child.send_signal(signal.SIGTERM)
  output = child.communicate(timeout=300)[0].decode()
  assert child.returncode == 0, output[-2000:]
  latest = checkpoint_lib.make_manager(workdir, read_only=True).latest_step()
  assert 5 <= latest < 100_000
  assert f'preempted: saved the checkpoint at step {latest}' in output
  assert max(losses(workdir)) <= latest + 1


@pytest.mark.slow
def test_restore_onto_one_device_and_another_mesh_split(corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir, steps=3)
  config.mesh.update(data=8, fsdp=1, tensor=1)
  train_lib.train(config, str(tmp_path))
  saved, _, _ = restore_state(config, str(tmp_path), 3)
  tokens = np.asarray(jax.random.randint(jax.random.key(0), (8, 32), 2, 258), np.int32)
  batch = {'inputs': tokens, 'targets': np.roll(tokens, -1, 1), 'segment_ids': np.ones_like(tokens),
           'positions': np.broadcast_to(np.arange(32), tokens.shape).astype(np.int32),
           'weights': np.ones(tokens.shape, np.float32)}

  def loss_on(mesh_sizes, devices):
    config.mesh.update(**mesh_sizes)
    state, model, mesh = restore_state(config, str(tmp_path), 3, devices)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.params), jax.device_get(state.params))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.logical_rules(config.mesh)):
      return float(jax.jit(train_step_lib.compute_loss, static_argnums=2)(state.params, batch, model)[0])

  one_device = loss_on(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  split = loss_on(dict(data=2, fsdp=2, tensor=2), None)
  np.testing.assert_allclose(split, one_device, rtol=1e-5)
  layers = restore_state(config, str(tmp_path), 3)[0].params['layers_0']
  assert layers['mlp']['gate']['kernel'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor')


@pytest.mark.slow
def test_config_that_does_not_match_the_checkpoint_is_a_clear_error(corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir, steps=3)
  train_lib.train(config, str(tmp_path))
  # Each checkpoint carries the resolved config it was trained with.
  manager = checkpoint_lib.make_manager(str(tmp_path), read_only=True)
  stored = manager.restore(3, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
  assert stored == json.loads(config.to_json_best_effort())
  config.model.d_model = 64
  with pytest.raises(checkpoint_lib.CheckpointError, match='does not match this config'):
    restore_state(config, str(tmp_path), 3)


@pytest.mark.slow
def test_an_unfinished_save_never_looks_like_a_checkpoint(corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir, steps=3)
  train_lib.train(config, str(tmp_path))
  # What a crash in the middle of writing step 6 leaves: Orbax writes into <step>.orbax-checkpoint-tmp-<time> and
  # renames it to <step> only once every item is complete.
  checkpoints = tmp_path / 'checkpoints'
  shutil.copytree(checkpoints / '3', checkpoints / '6.orbax-checkpoint-tmp-1732500000')
  manager = checkpoint_lib.make_manager(str(tmp_path), read_only=True)
  assert manager.all_steps() == [3] and manager.latest_step() == 3
  config.train.steps = 4
  train_lib.train(config, str(tmp_path))  # resumes from 3, not from the half-written 6
  assert sorted(losses(str(tmp_path))) == [1, 2, 3, 4]


def test_keep_period_checkpoints_are_never_deleted(tmp_path):
  config = tiny.get_config()
  config.checkpoint.update(keep=2, keep_period=3, async_save=False)
  manager = checkpoint_lib.make_manager(str(tmp_path), config.checkpoint)
  for step in range(1, 9):
    checkpoint_lib.save(manager, step, {'w': np.full(4, step, np.float32)})
  manager.wait_until_finished()
  # The newest `keep`, and every multiple of keep_period however old (an evaluation may reach it late).
  expected = sorted({7, 8} | {step for step in range(1, 9) if step % 3 == 0})
  assert checkpoint_lib.make_manager(str(tmp_path), read_only=True).all_steps() == expected == [3, 6, 7, 8]


@pytest.mark.parametrize('every, keep_period, message', [
    (2, 5, 'checkpoint.keep_period = 5 is not allowed: expected a multiple of checkpoint.every = 2'),
    (2, -4, 'checkpoint.keep_period = -4 is not allowed: expected a number >= 0'),
])
def test_bad_keep_period_is_one_clear_error(every, keep_period, message):
  config = tiny.get_config()
  config.checkpoint.update(every=every, keep_period=keep_period)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_a_restored_float16_state_has_a_fresh_states_avals(tmp_path):
  """Shapes, dtypes and weak types leaf by leaf (DynamicScale's fin_steps among them): a resumed run's jitted step has
  a fresh run's signature, so the persistent compilation cache serves its first step."""
  config = tiny.get_config()
  config.model.update(compute_dtype='float16', **OVERRIDES)
  mesh = sharding_lib.make_mesh(config.mesh)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.logical_rules(config.mesh)):
    fresh, shardings = train_step_lib.create_train_state(config, model, optimizer, mesh)
    abstract, _ = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
    manager = checkpoint_lib.make_manager(str(tmp_path), config.checkpoint)
    checkpoint_lib.save(manager, 1, fresh)
    manager.wait_until_finished()
    restored = checkpoint_lib.restore(manager, 1, abstract, shardings)

  def avals(state):
    return {jax.tree_util.keystr(path): (leaf.shape, leaf.dtype, leaf.aval.weak_type)
            for path, leaf in jax.tree_util.tree_leaves_with_path(state)}
  assert fresh.loss_scale is not None
  assert avals(restored) == avals(fresh)


def test_a_rows_run_resumes_on_another_process_count_with_the_batches_it_would_have_had(corpus_data_dir, tmp_path,
                                                                                           monkeypatch):
  """data.process_split=rows: every process iterates the global stream, so a checkpoint two processes wrote resumes on
  one from process 0's position, bit for bit; with `documents` each position is the process's own: a clear error."""
  config = small_config(corpus_data_dir, steps=6)
  config.data.process_split = 'rows'
  tokenizer = tokenizers.make_tokenizer(config.data)
  reference = train_lib.make_data_iterator(config, tokenizer, 8)
  for _ in range(2):
    next(reference)
  manager = checkpoint_lib.make_manager(str(tmp_path))
  checkpoint_lib.save(manager, 2, {'w': np.zeros(2, np.float32)}, reference)
  manager.wait_until_finished()
  expected = [next(reference) for _ in range(3)]
  # What two processes would have saved instead: each its own iterator's position after the same two batches.
  data_dir = tmp_path / 'checkpoints' / '2' / 'data'
  (data_dir / 'process_0-of-1.json').unlink()
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    process_iterator = train_lib.make_data_iterator(config, tokenizer, 8)
    for _ in range(2):
      next(process_iterator)
    (data_dir / f'process_{index}-of-2.json').write_text(json.dumps(process_iterator.get_state(), indent=4))
  monkeypatch.undo()

  abstract = {'w': jax.ShapeDtypeStruct((2,), np.float32)}
  shardings = {'w': jax.sharding.SingleDeviceSharding(jax.devices()[0])}
  resumed = train_lib.make_data_iterator(config, tokenizer, 8)
  checkpoint_lib.restore(manager, 2, abstract, shardings, resumed)
  for batch in expected:
    jax.tree.map(np.testing.assert_array_equal, next(resumed), batch)
  config.data.process_split = 'documents'
  with pytest.raises(checkpoint_lib.CheckpointError, match=r'checkpoint 2 in .* was written by 2 processes and this '
                     r'run has 1: .*resume it with 2 processes'):
    checkpoint_lib.restore(manager, 2, abstract, shardings, train_lib.make_data_iterator(config, tokenizer, 8))
