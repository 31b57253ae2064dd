"""The device mesh and where every array lives on it, from `config.mesh`.

The model names its axes (`embed`, `heads`, `mlp`, ...); `config.mesh.logical_axis_rules` maps each name onto mesh
axes `data`, `fsdp`, `tensor`. This module turns that table into `NamedSharding`s and checks, before anything is
compiled, that every sharded dimension divides evenly. Over several TPU slices each mesh axis is a DCN part (across
slices: `config.mesh.dcn_*`) times an ICI part (within a slice: `config.mesh.data/fsdp/tensor`).
"""

import math
import os
import types

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding

from perijax.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')


class ShardingError(UserError, ValueError):
  """The mesh, batch or a parameter shape cannot be laid out as the config asks."""


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed for several processes: explicit flags, or automatic on TPU pods and SLURM jobs."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU-only runs: collectives across processes
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''):
    jax.distributed.initialize()


def mesh_shape(mesh_config, device_count):
  """Resolves -1 to the devices the other axes leave, and checks the product is the device count."""
  sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if -1 in sizes.values():
    if device_count % fixed:
      raise ShardingError(f'config.mesh {sizes}: the fixed axes (product {fixed}) do not divide the '
                          f'{device_count} devices; choose sizes whose product divides {device_count}')
    sizes = {axis: device_count // fixed if size == -1 else size for axis, size in sizes.items()}
  if math.prod(sizes.values()) != device_count:
    raise ShardingError(f'config.mesh {sizes} has {math.prod(sizes.values())} devices but there are {device_count}; '
                        f'data x fsdp x tensor must equal the device count (use -1 for one axis to fill it)')
  return tuple(sizes[axis] for axis in MESH_AXES)


def slice_count(devices):
  """TPU slices the devices span (a single slice's devices, and CPU/GPU devices, have no slice_index)."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_config, devices=None, num_slices=None):
  """A mesh over all devices of all processes; over several slices, a hybrid mesh whose DCN part
  (`mesh.dcn_data` x `mesh.dcn_fsdp`; data parallel across slices by default) joins per-slice ICI meshes.

  `num_slices` simulates slices on devices that have none (CPU): consecutive devices form a slice.
  Auto axes, not jax.make_mesh's default Explicit ones: Flax's logical partitioning is GSPMD-style, and with Explicit
  axes a data-sharded Dense fails in the backward pass ("ShardingTypeError: Contracting dimensions are sharded").
  """
  devices = jax.devices() if devices is None else devices
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = num_slices or slice_count(devices)
  if len(devices) % slices:
    raise ShardingError(f'{len(devices)} devices do not split into {slices} slices of equal size')
  ici = mesh_shape(mesh_config, len(devices) // slices)
  if slices == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  dcn = {'dcn_data': mesh_config.get('dcn_data', -1), 'dcn_fsdp': mesh_config.get('dcn_fsdp', 1)}
  fixed = math.prod(size for size in dcn.values() if size != -1)
  dcn = {k: slices // fixed if size == -1 and slices % fixed == 0 else size for k, size in dcn.items()}
  if math.prod(dcn.values()) != slices:
    raise ShardingError(f'config.mesh.dcn_data x dcn_fsdp = {dcn} must multiply to the {slices} slices (use -1 '
                        f'for one of them to fill it)')
  dcn = (dcn['dcn_data'], dcn['dcn_fsdp'], 1)
  simulated = slice_count(devices) != slices
  if simulated:  # tag each device with its slice for create_hybrid_device_mesh, and untag its result
    per_slice = len(devices) // slices
    devices = [types.SimpleNamespace(device=d, slice_index=i // per_slice, platform=d.platform,
                                     device_kind=d.device_kind, id=d.id) for i, d in enumerate(devices)]
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  if simulated:
    grid = np.vectorize(lambda d: d.device, otypes=[object])(grid)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_config):
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_config.logical_axis_rules)


def shardings_of(boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves are boxed with logical axis names (unboxed leaves: replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree, shardings, mesh):
  """Every sharded dimension must split evenly over its mesh axes; says which tensor does not."""
  problems = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                                    jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      ways = math.prod(mesh.shape[a] for a in axes)
      if dim % ways:
        problems.append(f'{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dimension {dim} over mesh axes '
                        f'{axes} ({ways} ways)')
  if problems:
    raise ShardingError('these tensors do not divide evenly over the mesh: ' + '; '.join(problems[:5]) +
                        (f' (+{len(problems) - 5} more)' if len(problems) > 5 else '') +
                        '; change config.mesh or the model shape')


def batch_sharding(mesh, rules):
  """Batch dimension over data x fsdp (the 'batch' rule), sequence replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length'), rules))


def check_batch(global_batch, mesh, process_count, grad_accum_steps=1):
  """The micro-batch must split over the data-parallel devices and over the processes feeding them."""
  if global_batch % grad_accum_steps:
    raise ShardingError(f'config.train.batch_size = {global_batch} is not divisible by '
                        f'config.optimizer.grad_accum_steps = {grad_accum_steps}')
  micro = global_batch // grad_accum_steps
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  if micro % ways:
    raise ShardingError(f'batch of {micro} sequences (config.train.batch_size / grad_accum_steps) is not divisible '
                        f'by data x fsdp = {ways} devices; use a multiple of {ways}')
  if micro % process_count:
    raise ShardingError(f'batch of {micro} sequences is not divisible by the {process_count} processes feeding it')
  return micro


def global_batch_from_local(local_batch, sharding):
  """Each process passes its slice; JAX assembles the global array (multi-host input, no gather)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)
