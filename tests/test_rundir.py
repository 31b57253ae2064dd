"""The run directory: one layout, epath paths, and a workdir on an object store (which cannot append) that works."""

import builtins
import json

import pytest

from configs import default
from perijax import evaluate
from perijax import metrics
from perijax import rundir
from perijax import runs as runs_lib
from perijax import train


def test_layout_of_a_local_and_an_object_store_workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert rundir.is_local('runs/a') and not rundir.is_local('gs://bucket/runs/a')
  assert str(rundir.checkpoints('runs/a')) == str(tmp_path / 'runs' / 'a' / 'checkpoints')  # absolute, for Orbax
  remote = 'gs://bucket/runs/a'
  assert [str(p) for p in (rundir.config_file(remote), rundir.tokenizer_file(remote), rundir.checkpoints(remote),
                           rundir.metrics_part(remote, 3), rundir.eval_result(remote, 40),
                           rundir.checkpoint_state(remote, 40))] == [
      f'{remote}/config.json', f'{remote}/tokenizer.json', f'{remote}/checkpoints',
      f'{remote}/metrics/part_000003.jsonl', f'{remote}/eval/step_40.json', f'{remote}/checkpoints/40/state']


@pytest.fixture
def object_store(monkeypatch):
  """Makes every workdir count as an object store, and any file opened for appending an error (as on one)."""
  monkeypatch.setattr(rundir, 'is_local', lambda workdir: False)
  real_open = builtins.open

  def open_without_append(file, mode='r', *args, **kwargs):
    if 'a' in mode:
      raise PermissionError(f'{file}: an object store cannot append')
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, 'open', open_without_append)


def small_config(data_dir, steps):
  config = default.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2)
  config.train.update(steps=steps, batch_size=8, seq_len=128, log_every=1, stats_every=1)
  config.checkpoint.update(every=3, async_save=False)
  config.data.update(data_dir=data_dir, eval_max_batches=1, prefetch=0)
  config.eval.update(batch_size=8, max_examples=4)
  return config


@pytest.mark.slow
def test_training_and_evaluation_on_a_workdir_that_refuses_appends(object_store, corpus_data_dir, tmp_path,
                                                                   monkeypatch):
  monkeypatch.setattr(metrics, 'PART_LINES', 4)
  workdir = str(tmp_path / 'run')
  train.train(small_config(corpus_data_dir, steps=6), workdir)
  train.train(small_config(corpus_data_dir, steps=8), workdir)  # resumes from step 6: a part of its own
  [result] = evaluate.run(workdir, step=8)

  parts = [path.name for path in (tmp_path / 'run' / 'metrics').iterdir()]
  assert sorted(parts) == ['part_000001.jsonl', 'part_000002.jsonl', 'part_000003.jsonl']  # 4 + 2 lines, then 2
  assert not (tmp_path / 'run' / 'metrics.jsonl').exists()
  assert [len(rundir.metrics_part(workdir, n).read_text().splitlines()) for n in (1, 2, 3)] == [4, 2, 2]
  run = runs_lib.load_run(workdir)
  assert [line['step'] for line in run.metrics] == list(range(1, 9))
  assert run.config['train']['steps'] == 8 and list(run.evals) == [8]
  assert json.loads(rundir.eval_result(workdir, 8).read_text())['loss'] == pytest.approx(result['loss'])
  assert (tmp_path / 'run' / 'checkpoints' / '8').is_dir() and (tmp_path / 'run' / 'tokenizer.json').is_file()
