"""The pod-scale dry run: real train step compiled for 8 and 64 simulated CPU devices (one subprocess each, since the
device count is fixed when jax starts), its memory figures against the parameter count, and its errors."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import tiny
from perijax import dryrun
from perijax import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small enough to compile in seconds, every matrix divisible by 64 devices, batch divisible by 64.
SMALL = ['--config.model.d_model=64', '--config.model.num_layers=2', '--config.model.num_heads=2',
         '--config.train.batch_size=64', '--config.train.seq_len=32']


def small_config():
  config = tiny.get_config()
  config.model.update(d_model=64, num_layers=2, num_heads=2)
  config.train.update(batch_size=64, seq_len=32)
  return config


def run_dryrun(tmp_path, devices, *args):
  out = tmp_path / f'dryrun_{devices}.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  devices_arg = [f'--devices={devices}'] if devices else []
  process = subprocess.run(
      [sys.executable, '-m', 'perijax.dryrun', '--config=configs/tiny.py', *devices_arg, *SMALL, *args,
       f'--json={out}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  report = json.loads(out.read_text()) if out.exists() else None
  return process, report


def replicated_param_bytes(model_config):
  """Bytes of the parameters no mesh axis splits (norm scales), from the model's own parameter tree."""
  params = jax.tree_util.tree_leaves_with_path(params_lib.abstract_params(model_config))
  return sum(4 * math.prod(leaf.value.shape if hasattr(leaf, 'value') else leaf.shape)
             for path, leaf in params if 'scale' in jax.tree_util.keystr(path))


def check_memory_consistent_with_parameter_count(report, fsdp):
  config = small_config()
  total_param_bytes = 4 * params_lib.count_params(config.model)['total']  # float32 master weights
  replicated = replicated_param_bytes(config.model)
  memory = report['memory_per_device']
  assert report['mesh']['fsdp'] == fsdp
  assert report['params_global_bytes'] == total_param_bytes
  # Sharded matrices hold 1/fsdp each; norm scales are whole on every device.
  assert memory['params_bytes'] == (total_param_bytes - replicated) // fsdp + replicated
  # AdamW: two moments per parameter (plus scalar counts).
  assert 2 * memory['params_bytes'] <= memory['opt_state_bytes'] <= 2 * memory['params_bytes'] + 64
  # XLA's own argument size: the state computed from the shardings plus this device's slice of the batch.
  batch_bytes = 5 * 4 * (64 // report['devices'] * report['mesh']['tensor']) * 32
  assert memory['argument_bytes'] == pytest.approx(memory['state_bytes'] + batch_bytes, rel=0.01)
  assert memory['temp_bytes'] > 0
  assert memory['total_bytes'] == memory['argument_bytes'] + memory['temp_bytes']
  tokens = 64 * 32
  assert report['flops_per_step'] == params_lib.train_flops_per_token(config.model, 32) * tokens
  assert report['step_time_s'] == pytest.approx(
      report['flops_per_step'] / report['devices'] / (report['accelerator']['peak_flops'] * report['mfu']))
  assert report['fits']
  names = {row['name'] for row in report['param_sharding']}
  assert 'embed/embedding' in names and any('mlp/up/kernel' in n for n in names)


@pytest.mark.slow
def test_dryrun_8_devices_fsdp(tmp_path):
  process, report = run_dryrun(tmp_path, 8, '--config.mesh.data=1', '--config.mesh.fsdp=8')
  assert process.returncode == 0, process.stderr[-2000:]
  assert report['devices'] == 8
  check_memory_consistent_with_parameter_count(report, fsdp=8)
  for heading in ('memory per device:', 'parameter sharding', 'FITS', 'tokens/s'):
    assert heading in process.stdout


@pytest.mark.slow
def test_dryrun_64_devices_data_and_fsdp(tmp_path):
  process, report = run_dryrun(tmp_path, 64, '--config.mesh.data=4', '--config.mesh.fsdp=16',
                               '--accelerator=tpu_v4')
  assert process.returncode == 0, process.stderr[-2000:]
  assert report['devices'] == 64 and report['mesh'] == {'data': 4, 'fsdp': 16, 'tensor': 1}
  assert report['accelerator']['name'] == 'tpu_v4'
  check_memory_consistent_with_parameter_count(report, fsdp=16)


def test_impossible_mesh_is_one_clear_line(tmp_path):
  process, report = run_dryrun(tmp_path, 8, '--config.mesh.data=1', '--config.mesh.tensor=3')
  assert process.returncode != 0 and report is None
  message = process.stderr.strip().splitlines()[-1]
  assert message.startswith('perijax.dryrun: error: config.mesh') and 'device count' in message
  assert 'Traceback' not in process.stderr


def test_mesh_the_model_cannot_divide_names_tensors_and_working_meshes(tmp_path):
  # 2 heads cannot be split 8 ways over the tensor axis.
  process, _ = run_dryrun(tmp_path, 8, '--config.mesh.data=1', '--config.mesh.tensor=8')
  assert process.returncode != 0 and 'Traceback' not in process.stderr
  message = process.stderr.strip().splitlines()[-1]
  assert 'do not divide evenly' in message and 'query' in message
  assert 'meshes of these devices that divide it' in message and 'tensor=1' in message


def test_suggested_meshes_fit_the_budget_and_shard_enough():
  config = small_config()
  devices = jax.devices()[:8]
  all_meshes = dryrun.suggest_meshes(config, devices, budget_bytes=float('inf'), limit=100)
  replicated_state = max(m['state_bytes'] for m in all_meshes)  # data=8: every device holds the whole state
  assert {(m['data'], m['fsdp'], m['tensor']) for m in all_meshes} >= {(8, 1, 1), (1, 8, 1), (2, 4, 1)}
  budget = replicated_state / 3
  fitting = dryrun.suggest_meshes(config, devices, budget_bytes=budget, limit=100)
  assert fitting and all(m['state_bytes'] <= budget for m in fitting)
  assert all(m['fsdp'] * m['tensor'] >= 4 for m in fitting)  # needs the state split at least ~3 ways
  assert fitting[0]['tensor'] == 1  # data/fsdp layouts are preferred over tensor parallelism


def test_unknown_accelerator_is_rejected():
  with pytest.raises(ValueError, match='tpu_v4'):
    dryrun.accelerator_spec('tpu_v9')


LIBTPU = importlib.util.find_spec('libtpu') is not None


@pytest.mark.slow
@pytest.mark.skipif(LIBTPU, reason='libtpu is installed: --topology compiles for TPU (next test)')
def test_topology_without_libtpu_says_so_and_simulates_its_slices(tmp_path):
  process, report = run_dryrun(tmp_path, None, '--topology=v5e-4', '--num_slices=2', '--config.mesh.data=1',
                               '--config.mesh.fsdp=-1')
  assert process.returncode == 0, process.stderr[-2000:]
  first = process.stderr.strip().splitlines()[0]
  assert first.startswith('perijax.dryrun: libtpu is not installed') and 'simulating 8 CPU devices' in first
  # 2 slices x 4 chips: data parallel across the slices (mesh.dcn_data = -1), fsdp over each slice's 4 devices.
  assert report['devices'] == 8 and report['slices'] == 2 and report['platform'] == 'cpu'
  assert report['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  assert report['accelerator']['name'] == 'tpu_v5e'  # the topology's memory and peak, unless --accelerator
  check_memory_consistent_with_parameter_count(report, fsdp=4)


@pytest.mark.skipif(not LIBTPU, reason='needs libtpu (the tpu extra)')
def test_topology_compiles_with_the_tpu_compiler(tmp_path):
  process, report = run_dryrun(tmp_path, None, '--topology=v5e-16', '--num_slices=2', '--config.mesh.data=1',
                               '--config.mesh.fsdp=-1')
  assert process.returncode == 0, process.stderr[-2000:]
  assert 'TPU_' not in process.stderr and 'WARNING' not in process.stderr  # libtpu's environment warnings silenced
  assert report['platform'] == 'tpu' and report['device_kind'] == 'TPU v5 lite'
  assert report['devices'] == 32 and report['slices'] == 2 and report['mesh'] == {'data': 2, 'fsdp': 16, 'tensor': 1}
  memory = report['memory_per_device']
  # TPU buffers are padded to the chip's tiles, so XLA's arguments are at least the state the shardings give.
  assert memory['argument_bytes'] >= memory['state_bytes'] > 0 and memory['temp_bytes'] > 0
  assert report['xla_flops_per_device_per_micro_step'] > 0
  assert 'TPU v5 lite devices in 2 slice(s)' in process.stdout and 'TPU compiler' in process.stdout


def test_bad_topology_is_one_line_before_jax_starts(tmp_path):
  for args, message in ((['--topology=v5e-300'], "--topology='v5e-300'"),
                        (['--topology=v5e-16', '--num_slices=0'], '--num_slices=0')):
    process, report = run_dryrun(tmp_path, None, *args)
    assert process.returncode != 0 and report is None and 'Traceback' not in process.stderr
    assert process.stderr.strip().splitlines() == [process.stderr.strip()] and message in process.stderr
