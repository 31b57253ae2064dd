"""The metrics writer: per-layer names, and the optional W&B run (offline: no network), resumed under the same id."""

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

from configs import default
from perijax import config as config_lib
from perijax import metrics
from perijax import rundir

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_scalars_name_each_layer_and_drop_what_is_not_a_number():
  flat = metrics.scalars({'loss': 2.5, 'spike': True, 'spikes': 3, 'residual_var': [0.5, 1.5, 4.0],
                          'note': 'text'})
  assert flat == {'loss': 2.5, 'spike': 1.0, 'spikes': 3.0, 'residual_var/layer_000': 0.5,
                  'residual_var/layer_001': 1.5, 'residual_var/layer_002': 4.0}
  assert all(type(value) is float for value in flat.values())


def test_an_uncomputed_mfu_stays_in_the_line_but_not_in_tensorboard():
  # NaN on every line by design (hardware.mfu_notice): TensorBoard would warn at each; a NaN loss is kept, it says much.
  assert metrics.scalars({'loss': math.nan, 'mfu': math.nan, 'tokens_per_sec': 10.0}).keys() == {'loss',
                                                                                                 'tokens_per_sec'}
  assert metrics.scalars({'mfu': 0.25}) == {'mfu': 0.25}


def wandb_config(mode='offline'):
  config = default.get_config()
  config.wandb.update(enabled=True, project='perijax-test', mode=mode)
  return config


def offline_records(run_dir, timeout_s=60):
  """(run record, [{key: value} per logged history row]) read back from an offline run's .wandb file.

  W&B's service may still be writing the file after run.finish() returns (seen on a loaded CI machine): it is read
  again, a half-written record included, until its 'exit' record is in.
  """
  from wandb.proto import wandb_internal_pb2
  from wandb.sdk.internal import datastore
  deadline, problem = time.monotonic() + timeout_s, 'no exit record'
  while time.monotonic() < deadline:
    run, history, finished, store = None, [], False, datastore.DataStore()
    try:
      (path,) = run_dir.glob('run-*.wandb')
      store.open_for_scan(str(path))
      while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof('record_type')
        if kind == 'run':
          run = record.run
        elif kind == 'history':
          history.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item})
        finished |= kind == 'exit'
    except Exception as error:  # pylint: disable=broad-except  (DataStore asserts on a record still being written)
      finished, problem = False, f'{type(error).__name__}: {error}'
    finally:
      store.close()
    if finished:
      return run, history
    time.sleep(0.2)
  pytest.fail(f'{run_dir}: no complete W&B run file after {timeout_s} s ({problem})')


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  wandb_dir = tmp_path / 'wandb_dir'
  wandb_dir.mkdir()
  monkeypatch.setenv('WANDB_MODE', 'offline')   # the environment wins over config.wandb.mode, as for any W&B program
  monkeypatch.setenv('WANDB_DIR', str(wandb_dir))
  monkeypatch.setenv('WANDB_SILENT', 'true')
  return wandb_dir


def test_wandb_run_holds_the_logged_numbers_and_a_resumed_run_keeps_its_id(tmp_path, offline_wandb):
  workdir = tmp_path / 'placement=peri,seed=0'
  workdir.mkdir()
  writer = metrics.MetricsWriter(str(workdir), total_steps=20, config=wandb_config(mode='online'))
  writer.write(10, {'loss': 3.25, 'residual_var': [0.5, 2.0, 8.0]})
  writer.write(20, {'loss': 2.75, 'skipped_steps': 1})
  writer.close()
  run_id = rundir.wandb_id_file(workdir).read_text().strip()
  (first,) = (offline_wandb / 'wandb').glob(f'offline-run-*-{run_id}')
  run, history = offline_records(first)
  assert run.run_id == run_id and run.display_name == workdir.name and run.project == 'perijax-test'
  assert history[0]['_step'] == 10 and history[0]['loss'] == 3.25
  assert [history[0][f'residual_var/layer_{i:03d}'] for i in range(3)] == [0.5, 2.0, 8.0]
  assert history[1]['_step'] == 20 and history[1]['skipped_steps'] == 1.0 and 'residual_var/layer_000' not in history[1]
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 2   # the other writers are unchanged
  assert next((workdir / 'tensorboard').iterdir()).stat().st_size > 0

  # A resumed training (same workdir) continues the same W&B run.
  writer = metrics.MetricsWriter(str(workdir), total_steps=40, config=wandb_config())
  writer.write(30, {'loss': 2.5})
  writer.close()
  runs = sorted((offline_wandb / 'wandb').glob('offline-run-*'))   # a second start within a second gets '-1' added
  assert len(runs) == 2 and all(f'-{run_id}' in path.name for path in runs)
  second = next(path for path in runs if path != first)
  run, history = offline_records(second)
  assert run.run_id == run_id
  assert [(row['_step'], row['loss']) for row in history] == [(30, 2.5)]


def test_wandb_is_off_by_default_and_not_even_imported(tmp_path):
  code = ('import sys; from configs import default; from perijax import metrics\n'
          f'writer = metrics.MetricsWriter({str(tmp_path)!r}, 5, config=default.get_config())\n'
          'writer.write(5, {"loss": 1.0}); writer.close(); print("wandb" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == 'False'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl', 'tensorboard']


@pytest.mark.parametrize('field, value, message', [
    ('mode', 'sometimes', "config.wandb.mode = 'sometimes'.*'online', 'offline', 'disabled'"),
    ('project', ' ', 'non-empty W&B project'),
])
def test_bad_wandb_field_is_one_clear_error(field, value, message):
  config = wandb_config()
  config.wandb[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_wandb_enabled_without_the_package_is_a_config_error(monkeypatch):
  find_spec = config_lib.importlib.util.find_spec
  monkeypatch.setattr(config_lib.importlib.util, 'find_spec', lambda name: None if name == 'wandb' else find_spec(name))
  with pytest.raises(config_lib.ConfigError, match='config.wandb.enabled = True.*wandb package is not installed'):
    config_lib.validate(wandb_config())
  config_lib.validate(default.get_config())   # disabled: the package is not needed


def test_a_config_without_the_wandb_group_still_validates():
  config = default.get_config()
  del config['wandb']   # config.json of a run made before the group existed
  assert config_lib.validate(config) is config
