"""Cloud TPU slice names -> the topologies libtpu compiles for (no libtpu needed), and multi-slice (hybrid) meshes on
simulated slices of the 8 CPU devices: which devices each mesh axis spans."""

import jax
import ml_collections
import numpy as np
import pytest

from perijax import sharding as sharding_lib
from perijax import topology

# Published Cloud TPU slice shapes (v4/v5p sizes count TensorCores, two per chip; v5e/v6e count chips).
KNOWN = [
    ('v4-8', 'v4:2x2x1', 4, (False, False, False)),
    ('v4-32', 'v4:2x2x4', 16, (False, False, False)),
    ('v4-128', 'v4:4x4x4', 64, (True, True, True)),
    ('v4-512', 'v4:4x8x8', 256, (True, True, True)),
    ('v5p-256', 'v5:4x4x8', 128, (True, True, True)),
    ('v5p-512', 'v5:4x8x8', 256, (True, True, True)),
    ('v5p-1024', 'v5:8x8x8', 512, (True, True, True)),
    ('v5e-8', 'v5e:2x4', 8, (False, False, False)),
    ('v5e-16', 'v5e:4x4', 16, (False, False, False)),
    ('v5e-128', 'v5e:8x16', 128, (False, True, False)),
    ('v5e-256', 'v5e:16x16', 256, (True, True, False)),
    ('v6e-64', 'v6e:8x8', 64, (False, False, False)),
    ('v6e-256', 'v6e:16x16', 256, (True, True, False)),
]


@pytest.mark.parametrize('name, topology_name, chips, wrap', KNOWN)
def test_names_map_to_published_slice_shapes(name, topology_name, chips, wrap):
  parsed = topology.parse(name)
  assert (parsed.topology_name, parsed.devices_per_slice, parsed.wrap) == (topology_name, chips, wrap)
  assert parsed.chip_config_name == ('megacore' if name.startswith(('v4', 'v5p')) else 'default')
  assert parsed.accelerator == 'tpu_' + name.split('-')[0]
  assert topology.parse(name, num_slices=3).devices == 3 * chips


def test_every_size_grid_holds_its_chips():
  for generation, (_, _, dims, cores, smallest, largest, _, _) in topology.GENERATIONS.items():
    size = smallest
    while size <= largest:
      parsed = topology.parse(f'{generation}-{size}')
      grid = [int(d) for d in parsed.topology_name.split(':')[1].split('x')]
      assert len(grid) == dims and np.prod(grid) == size // cores == parsed.devices_per_slice
      size *= 2


@pytest.mark.parametrize('name, slices, message', [
    ('v5e-3', 1, 'powers of two from 1 to 256'), ('v4-4', 1, 'from 8 to 4096'), ('v7-8', 1, 'is not known'),
    ('v5e256', 1, 'is not known'), ('v5e-512', 1, 'to 256'), ('v5e-16', 0, 'num_slices')])
def test_bad_names_and_slice_counts_are_one_line(name, slices, message):
  with pytest.raises(ValueError, match=message) as error:
    topology.parse(name, slices)
  assert '\n' not in str(error.value)


def mesh_config(**sizes):
  config = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=-1, dcn_fsdp=1))
  config.update(**sizes)
  return config


def device_ids(mesh):
  return np.vectorize(lambda d: d.id)(mesh.devices)


def test_default_is_data_parallel_across_slices_fsdp_within():
  mesh = sharding_lib.make_mesh(mesh_config(), jax.devices(), num_slices=2)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  ids = device_ids(mesh)[:, :, 0]
  # Each data replica is one whole slice: FSDP's per-layer all-gathers never cross the slow network.
  assert [set(row) for row in ids.tolist()] == [{0, 1, 2, 3}, {4, 5, 6, 7}]


def test_fsdp_across_slices_and_data_within():
  mesh = sharding_lib.make_mesh(mesh_config(data=2, fsdp=2, dcn_data=1, dcn_fsdp=2), jax.devices(), num_slices=2)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4, 'tensor': 1}
  ids = device_ids(mesh)[:, :, 0]
  slice_of = lambda i: i // 4  # noqa: E731
  # Along fsdp, the first half of the positions is one slice and the second half the other.
  for row in ids:
    assert {slice_of(i) for i in row[:2]} == {slice_of(row[0])} != {slice_of(i) for i in row[2:]}
  assert sorted(ids.ravel().tolist()) == list(range(8))


def test_one_slice_is_the_plain_mesh():
  config = mesh_config(data=2, fsdp=4)
  plain = jax.make_mesh((2, 4, 1), sharding_lib.MESH_AXES, devices=jax.devices(),
                        axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert (device_ids(sharding_lib.make_mesh(config, jax.devices())) == device_ids(plain)).all()
  assert sharding_lib.slice_count(jax.devices()) == 1  # CPU devices carry no slice index


@pytest.mark.parametrize('sizes, slices, message', [
    (dict(dcn_data=4), 2, 'dcn_data x dcn_fsdp .* 2 slices'),
    (dict(dcn_data=1, dcn_fsdp=1), 2, 'dcn_data x dcn_fsdp'),
    ({}, 3, '8 devices do not split into 3 slices'),
    (dict(fsdp=8), 2, 'has 8 devices but there are 4'),  # the ICI sizes are per slice
])
def test_meshes_that_do_not_fit_the_slices_are_rejected(sizes, slices, message):
  with pytest.raises(sharding_lib.ShardingError, match=message):
    sharding_lib.make_mesh(mesh_config(**sizes), jax.devices(), num_slices=slices)
