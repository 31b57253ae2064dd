"""Multi-host batch input: every process feeds its own rows, so no batch shard may have devices on two processes."""

import types

import jax
import numpy as np
import pytest

from configs import tiny
from perijax import sharding as sharding_lib
from perijax import train_step as train_step_lib
from perijax.evaluate import eval_lib


def fake_mesh(process_ids):
  """What check_batch reads of a mesh: its axis sizes and devices (here with these process indices)."""
  process_ids = np.asarray(process_ids)
  devices = np.vectorize(lambda index: types.SimpleNamespace(process_index=int(index)), otypes=[object])(process_ids)
  return types.SimpleNamespace(shape=dict(zip(sharding_lib.MESH_AXES, process_ids.shape)), devices=devices)


def two_hosts_of_four(data, fsdp, tensor):
  """Process indices of a [data, fsdp, tensor] mesh over 2 hosts x 4 devices, devices in process order."""
  return (np.arange(8) // 4).reshape(data, fsdp, tensor)


def test_batch_shards_within_one_process_are_allowed():
  assert sharding_lib.processes_sharing_batch_shards(two_hosts_of_four(2, 1, 4)) == {}   # tensor within a host
  assert sharding_lib.processes_sharing_batch_shards(two_hosts_of_four(2, 2, 2)) == {}
  assert sharding_lib.processes_sharing_batch_shards(two_hosts_of_four(8, 1, 1)) == {}


def test_batch_shards_spanning_processes_are_found():
  assert sharding_lib.processes_sharing_batch_shards(two_hosts_of_four(1, 1, 8)) == {(0, 0): [0, 1]}
  # tensor=2 pairs whose devices alternate between the hosts: every shard spans both
  interleaved = (np.arange(8) % 2).reshape(2, 2, 2)
  assert sharding_lib.processes_sharing_batch_shards(interleaved) == {
      (0, 0): [0, 1], (0, 1): [0, 1], (1, 0): [0, 1], (1, 1): [0, 1]}


def test_check_batch_rejects_tensor_parallelism_across_hosts():
  message = (r'config.mesh data=1 fsdp=1 tensor=8 over 2 processes puts batch shard \(data, fsdp\) = \(0, 0\) on '
             r"devices of processes \[0, 1\].*one process's 4 devices")
  with pytest.raises(sharding_lib.ShardingError, match=message):
    sharding_lib.check_batch(8, fake_mesh(two_hosts_of_four(1, 1, 8)), 2)
  assert sharding_lib.check_batch(8, fake_mesh(two_hosts_of_four(2, 1, 4)), 2) == 8
  # The dry run compiles as one process, whatever hosts its compile-only devices belong to.
  assert sharding_lib.check_batch(8, fake_mesh(two_hosts_of_four(1, 1, 8)), 1) == 8


def test_evaluation_falls_back_to_data_parallel_when_the_stored_mesh_spans_hosts(monkeypatch):
  config = tiny.get_config()
  config.mesh.update(data=4, fsdp=1, tensor=2)
  real = sharding_lib.processes_sharing_batch_shards
  # Two processes whose devices alternate along the mesh: the stored tensor=2 pairs each span both.
  monkeypatch.setattr(sharding_lib, 'processes_sharing_batch_shards',
                      lambda ids: real(np.arange(ids.size).reshape(ids.shape) % 2))
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  mesh, _, _, description = eval_lib.make_eval_mesh(config, train_step_lib.make_model(config))
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert description.startswith('data-parallel')
