"""`perijax.evaluate`: the documented result of a checkpoint, constant logits at chance, --all/--watch, bad input."""

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import default
from perijax import checkpoint as checkpoint_lib
from perijax import evaluate
from perijax.evaluate import eval_lib
from perijax import optimizer as optimizer_lib
from perijax import sharding as sharding_lib
from perijax import train
from perijax import train_step as train_step_lib
from perijax.data import pipeline, tokenizers
from perijax.tasks import next_line, scoring

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 4  # checkpoints at 2 and 4


def tiny_config(data_dir):
  config = default.get_config()
  config.model.update(vocab_size=320, d_model=32, num_layers=2, num_heads=2)
  # seq_len 128: next_line's continuations (a line of up to 100 bytes) must fit one row.
  config.train.update(steps=STEPS, batch_size=8, seq_len=128, log_every=2, stats_every=2)
  config.optimizer.update(warmup_steps=1)
  config.checkpoint.update(every=2, keep=5, async_save=False)
  config.data.update(data_dir=data_dir, eval_max_batches=2, prefetch=0)
  config.eval.update(batch_size=8, max_examples=12)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, corpus_data_dir):
  """A tiny run with checkpoints at steps 2 and 4; tests evaluate copies of it."""
  workdir = tmp_path_factory.mktemp('run') / 'workdir'
  train.train(tiny_config(corpus_data_dir), str(workdir))
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = tmp_path / 'workdir'
  shutil.copytree(trained, copy)
  return copy


def snapshot(directory):
  """Every file under `directory` with its size and modification time: to show nothing was written or deleted."""
  return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in pathlib.Path(directory).rglob('*')}


def eval_batches(config, tokenizer):
  return pipeline.make_eval_iterator(config.data, tokenizer, split=config.data.eval_split,
                                     batch_size=config.eval.batch_size, seq_len=config.train.seq_len,
                                     max_batches=config.data.eval_max_batches)


@pytest.mark.slow
def test_result_has_the_documented_keys_and_the_training_loss(workdir, corpus_data_dir):
  [result] = evaluate.run(str(workdir), step=STEPS)
  with open(workdir / 'eval' / f'step_{STEPS}.json') as f:
    written = json.load(f)
  assert {'step', 'loss', 'perplexity', 'bits_per_byte', 'tokens', 'layers', 'tasks'} <= set(written)   # documented
  assert written['step'] == STEPS and written == json.loads(json.dumps(result))
  assert written['perplexity'] == pytest.approx(math.exp(written['loss']), rel=1e-12)
  assert written['bits_per_byte'] == pytest.approx(written['loss'] / math.log(2) / written['bytes_per_token'])
  assert all(len(values) == 2 for values in written['layers'].values())
  assert set(written['layers']) >= {'residual_var', 'max_abs', 'fp16_headroom', 'fp16_overflow'}
  assert written['layers']['fp16_headroom'] == pytest.approx([m / 65504 for m in written['layers']['max_abs']])
  assert written['tasks']['next_line']['n'] == 12
  assert any(name.startswith('events') for name in os.listdir(workdir / 'eval' / 'tensorboard'))
  # lm-evaluation-harness's results file beside it (perijax/tasks/lm_eval_results.py), with the same numbers.
  [lm_eval_file] = (workdir / 'eval' / 'lm_eval' / f'workdir__step_{STEPS}').glob('results_*.json')
  lm_eval = json.loads(lm_eval_file.read_text())
  assert lm_eval['results']['next_line']['acc,none'] == written['tasks']['next_line']['acc']
  assert lm_eval['n-samples']['next_line'] == {'effective': 12,
                                               'original': len(next_line.next_line_items(corpus_data_dir, 0))}

  # Independently: the full train state restored by the trainer's own code, and the trainer's loss per batch.
  config = tiny_config(corpus_data_dir)
  tokenizer = tokenizers.load_tokenizer(str(workdir))
  mesh = sharding_lib.make_mesh(config.mesh)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  abstract, shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
  manager = checkpoint_lib.make_manager(str(workdir), read_only=True)
  nll, weights = 0.0, 0.0
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.logical_rules(config.mesh)):
    state = checkpoint_lib.restore(manager, STEPS, abstract, shardings)
    for batch in eval_batches(config, tokenizer):
      loss, _ = train_step_lib.compute_loss(state.params, batch, model)
      nll += float(loss) * float(batch['weights'].sum())
      weights += float(batch['weights'].sum())
  assert written['tokens'] == int(weights) > 0
  assert written['loss'] == pytest.approx(nll / weights, rel=1e-5)


def test_constant_logits_give_ln_vocab_and_lm_eval_tie_breaking(workdir, corpus_data_dir):
  config = tiny_config(corpus_data_dir)
  evaluator = eval_lib.Evaluator(str(workdir), eval_lib.load_run_config(str(workdir)))
  params = evaluator.restore(STEPS)
  # Tied embeddings: a zero embedding makes every hidden state, and so every logit, zero.
  params['embed']['embedding'] = jax.numpy.zeros_like(params['embed']['embedding'])
  result = evaluator.evaluate_params(params)
  assert result['loss'] == pytest.approx(math.log(config.model.vocab_size), abs=1e-5)

  # Every token has log-prob -ln V, so a choice scores -ln V x its token count; lm-eval's argmax takes the first max.
  tokenizer = tokenizers.load_tokenizer(str(workdir))
  items = next_line.next_line_items(corpus_data_dir, config.eval.max_examples)
  correct = correct_norm = 0
  for item in items:
    counts = [len(scoring.encode_pair(tokenizer, *request)[1]) for request in item.requests]
    lls = [-count * math.log(config.model.vocab_size) for count in counts]
    correct += int(np.argmax(lls)) == item.gold
    correct_norm += int(np.argmax([ll / len(text) for ll, text in zip(lls, item.choice_texts)])) == item.gold
  assert result['tasks']['next_line'] == {'acc': correct / len(items), 'acc_norm': correct_norm / len(items),
                                          'n': len(items)}
  assert result['layers']['residual_var'] == [0.0, 0.0]


def test_all_evaluates_each_checkpoint_once(workdir):
  assert [r['step'] for r in evaluate.run(str(workdir), step=2)] == [2]
  assert [r['step'] for r in evaluate.run(str(workdir), evaluate_all=True)] == [4]
  before = snapshot(workdir)
  assert evaluate.run(str(workdir), evaluate_all=True) == []
  assert snapshot(workdir) == before


def test_watch_evaluates_new_checkpoints_and_stops_when_training_finished(workdir, tmp_path):
  final = workdir / 'checkpoints' / str(STEPS)
  staged = tmp_path / 'staged'
  shutil.move(final, staged)  # training has so far written only step 2
  outcome = {}

  def watch():
    try:
      outcome['results'] = evaluate.run(str(workdir), watch=True, poll_seconds=0.2, timeout_seconds=120)
    except Exception as error:  # pylint: disable=broad-except  reported by the assertion below
      outcome['error'] = error

  thread = threading.Thread(target=watch)
  thread.start()
  deadline = time.time() + 120
  while not (workdir / 'eval' / 'step_2.json').exists() and thread.is_alive() and time.time() < deadline:
    time.sleep(0.1)
  assert thread.is_alive(), outcome  # still waiting: training has not finished
  shutil.move(staged, final)  # the final checkpoint appears (one rename, as Orbax finalizes)
  thread.join(timeout=120)
  assert not thread.is_alive() and 'error' not in outcome, outcome
  assert [r['step'] for r in outcome['results']] == [2, STEPS]
  assert (workdir / 'eval' / f'step_{STEPS}.json').exists()


def test_watch_gives_up_when_no_checkpoint_appears(workdir):
  shutil.rmtree(workdir / 'checkpoints' / str(STEPS))
  with pytest.raises(evaluate.EvaluationError, match='no new checkpoint .* for 0.5 s'):
    evaluate.run(str(workdir), watch=True, poll_seconds=0.1, timeout_seconds=0.5)


def test_watch_waits_for_training_to_start_then_gives_up(tmp_path):
  with pytest.raises(evaluate.EvaluationError, match='has no config.json and tokenizer.json after 0.3 s'):
    evaluate.run(str(tmp_path / 'not_yet'), watch=True, poll_seconds=0.1, timeout_seconds=0.3)
  assert not (tmp_path / 'not_yet').exists()


def _break_workdir(workdir, how):
  """Damages a copy of the run the way `how` says; returns (run kwargs, error type, message pattern)."""
  if how == 'missing_workdir':
    return dict(workdir=str(workdir / 'nowhere')), FileNotFoundError, 'workdir .*nowhere does not exist'
  if how == 'no_checkpoint':
    shutil.rmtree(workdir / 'checkpoints')
    return dict(workdir=str(workdir)), ValueError, 'no checkpoint in .*checkpoints'
  if how == 'unknown_step':
    return dict(workdir=str(workdir), step=3), ValueError, 'no checkpoint at step 3 .* at steps 2, 4'
  if how == 'truncated_checkpoint':
    # Every array data file cut short (as by an interrupted copy). Evaluation reads the parameters only, so damage
    # confined to the optimizer state's bytes would go unnoticed here: cut them all.
    for data_file in (workdir / 'checkpoints' / '4' / 'state').glob('ocdbt.process_*/d/*'):
      with open(data_file, 'r+b') as f:
        f.truncate(16)
    return (dict(workdir=str(workdir)), checkpoint_lib.DamagedCheckpointError,
            'checkpoint 4 at .* is damaged: state/.* has 16 bytes, .* when saved')
  if how == 'deleted_metadata':
    (workdir / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()
    return (dict(workdir=str(workdir)), checkpoint_lib.DamagedCheckpointError,
            'checkpoint 4 at .* is damaged: state/_METADATA is missing')
  if how == 'config_mismatch':
    stored = json.loads((workdir / 'config.json').read_text())
    stored['model']['d_model'] = 64
    (workdir / 'config.json').write_text(json.dumps(stored))
    return (dict(workdir=str(workdir)), checkpoint_lib.CheckpointError,
            r"does not match the parameters stored in checkpoint 4: \['embed'\]\['embedding'\]: checkpoint \(320, 32\)")
  if how == 'unknown_task':
    return (dict(workdir=str(workdir), overrides=['--config.eval.tasks=next_line,lambada']), ValueError,
            "unknown task\\(s\\) 'lambada'; known tasks: next_line, arc_easy")
  if how == 'model_override':
    return (dict(workdir=str(workdir), overrides=['--config.model.d_model=64']), ValueError,
            'may only override config.{eval,data,mesh}')
  raise AssertionError(how)


BAD_INPUTS = ('missing_workdir', 'no_checkpoint', 'unknown_step', 'truncated_checkpoint', 'deleted_metadata',
              'config_mismatch', 'unknown_task', 'model_override')


@pytest.mark.parametrize('how', BAD_INPUTS)
def test_bad_input_is_one_clear_error_and_writes_nothing(workdir, how):
  kwargs, error_type, pattern = _break_workdir(workdir, how)
  before = snapshot(workdir)
  with pytest.raises(error_type, match=pattern):
    evaluate.run(**kwargs)
  assert snapshot(workdir) == before


@pytest.mark.slow
@pytest.mark.parametrize('how', ('unknown_step', 'truncated_checkpoint'))
def test_command_line_prints_one_error_line_and_exits_1(workdir, how):
  kwargs, _, pattern = _break_workdir(workdir, how)
  argv = [f'--workdir={kwargs["workdir"]}'] + ([f'--step={kwargs["step"]}'] if 'step' in kwargs else [])
  before = snapshot(workdir)
  process = subprocess.run([sys.executable, '-m', 'perijax.evaluate', *argv], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert process.returncode == 1
  # Exactly one error line, last, and no traceback (XLA's C++ logging may add its own warnings under load).
  errors = [line for line in process.stderr.splitlines() if line.startswith('perijax.evaluate: error: ')]
  assert len(errors) == 1 and process.stderr.rstrip().endswith(errors[0]), process.stderr
  assert 'Traceback' not in process.stderr and re.search(pattern, errors[0]), process.stderr
  assert snapshot(workdir) == before


@pytest.mark.slow
def test_command_line_evaluates_the_latest_checkpoint_with_overrides(workdir):
  process = subprocess.run([sys.executable, '-m', 'perijax.evaluate', f'--workdir={workdir}',
                            '--config.data.eval_max_batches=1', '--config.eval.max_examples=4'],
                           cwd=REPO, capture_output=True, text=True, timeout=300,
                           env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert process.returncode == 0, process.stderr
  written = json.loads((workdir / 'eval' / f'step_{STEPS}.json').read_text())
  assert written['tasks']['next_line']['n'] == 4
  assert written['tokens'] <= 8 * 128


def test_overrides_parse_as_the_field_types():
  config = default.get_config()
  eval_lib.apply_overrides(config, ['--config.eval.tasks=next_line,piqa', '--config.data.eval_max_batches=3',
                                    '--config.mesh.logical_axis_rules=(("batch", ("data", "fsdp")),)',
                                    'data.data_dir=/somewhere'])
  assert config.eval.tasks == ('next_line', 'piqa')
  assert config.data.eval_max_batches == 3 and config.data.data_dir == '/somewhere'
  assert config.mesh.logical_axis_rules == (('batch', ('data', 'fsdp')),)
  with pytest.raises(ValueError, match="config has no field 'eval.taks'; did you mean eval.tasks"):
    eval_lib.apply_overrides(config, ['--config.eval.taks=piqa'])
  with pytest.raises(ValueError, match="eval.batch_size='many': not a valid int"):
    eval_lib.apply_overrides(config, ['--config.eval.batch_size=many'])


def test_stored_config_reads_back_with_its_tuples(trained):
  config = eval_lib.load_run_config(str(trained))
  assert config.eval.tasks == ('next_line',)
  assert config.mesh.logical_axis_rules == default.get_config().mesh.logical_axis_rules
  assert config.model.d_model == 32


@pytest.mark.slow
def test_checkpoint_from_8_devices_evaluates_on_1_and_on_another_split(workdir):
  stored = json.loads((workdir / 'config.json').read_text())
  stored['mesh'].update(data=1, fsdp=4, tensor=2)  # the split it could have been trained on: same parameters
  (workdir / 'config.json').write_text(json.dumps(stored))
  config = eval_lib.load_run_config(str(workdir))
  results = {}
  for name, devices in (('eight', jax.devices()), ('one', jax.devices()[:1]), ('two', jax.devices()[:2])):
    evaluator = eval_lib.Evaluator(str(workdir), config, devices)
    results[name] = (evaluator.mesh_description, evaluator.evaluate(STEPS))
  assert results['eight'][0] == 'the stored config.mesh: data 1 x fsdp 4 x tensor 2'
  assert results['one'][0].startswith('data-parallel') and results['one'][0].endswith('data 1 x fsdp 1 x tensor 1')
  assert results['two'][0].endswith('data 2 x fsdp 1 x tensor 1')
  for name in ('one', 'two'):
    assert results[name][1]['loss'] == pytest.approx(results['eight'][1]['loss'], rel=1e-5)
    assert results[name][1]['tokens'] == results['eight'][1]['tokens']
    assert results[name][1]['tasks'] == results['eight'][1]['tasks']


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(workdir, tmp_path, free_port):
  """The same checkpoint over the whole eval split: one process with 8 devices, then two with 4 each (127.0.0.1)."""
  single = tmp_path / 'single'
  shutil.copytree(workdir, single)
  argv = [f'--step={STEPS}', '--config.data.eval_max_batches=0']
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  evaluate.run(str(single), step=STEPS, overrides=argv[1:])   # this process's 8 devices
  port = free_port
  processes = [subprocess.Popen([sys.executable, '-m', 'perijax.evaluate', f'--workdir={workdir}', *argv,
                                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**env, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
  assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
  one, two = (json.loads((w / 'eval' / f'step_{STEPS}.json').read_text()) for w in (single, workdir))
  assert two['loss'] == pytest.approx(one['loss'], rel=1e-5)
  assert two['tokens'] == one['tokens'] and two['tasks'] == one['tasks']
  assert one['mesh'].endswith('data 8 x fsdp 1 x tensor 1') and two['mesh'] == one['mesh']
