"""The device mesh and where every array lives on it: `config.mesh.logical_axis_rules` maps the model's axis names
(`embed`, `heads`, `mlp`, ...) onto the mesh axes `data`, `fsdp`, `tensor`. Over several TPU slices each mesh axis is
a DCN part (across slices: `config.mesh.dcn_*`) times an ICI part (within a slice: `config.mesh.data/fsdp/tensor`)."""

import math
import os

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


def _fill(sizes, total, unit):
  """The sizes ({name: size}, at most one -1: what the others leave) of axes that must multiply to `total` units."""
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if -1 in sizes.values() and total % fixed == 0:
    sizes = {name: total // fixed if size == -1 else size for name, size in sizes.items()}
  if math.prod(sizes.values()) != total:
    count = f'fixed axes multiply to {fixed}' if -1 in sizes.values() else f'has {fixed} {unit}s'
    raise ShardingError(f'config.mesh {" x ".join(sizes)} = {sizes} {count} but there are {total} {unit}s: '
                        f'their product must be the {unit} count (or divide it, with -1 for one axis to fill the rest)')
  return tuple(sizes.values())


def slice_count(devices):
  """TPU slices the devices span (a single slice's devices, and CPU/GPU devices, have no slice_index)."""
  return len({getattr(d, 'slice_index', 0) for d in devices})


def make_mesh(mesh_config, devices=None, num_slices=None):
  """A mesh over all devices of all processes; over several slices (`num_slices` simulates them on CPU devices:
  consecutive devices form one), per-slice ICI meshes joined by a DCN part, data parallel across slices by default.
  Auto axes, not jax.make_mesh's default Explicit ones: Flax's logical partitioning is GSPMD-style, and with Explicit
  axes a data-sharded Dense fails in the backward pass ("ShardingTypeError: Contracting dimensions are sharded")."""
  devices = jax.devices() if devices is None else devices
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices = num_slices or slice_count(devices)
  if len(devices) % slices:
    raise ShardingError(f'{len(devices)} devices do not split into {slices} slices of equal size')
  ici = _fill({axis: mesh_config[axis] for axis in MESH_AXES}, len(devices) // slices, 'device')
  if slices == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
  dcn = _fill({'dcn_data': mesh_config.get('dcn_data', -1), 'dcn_fsdp': mesh_config.get('dcn_fsdp', 1)}, slices,
              'slice') + (1,)
  if slice_count(devices) == slices:
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  else:  # simulated: each slice's devices in order, the slices in a DCN grid, as create_hybrid_device_mesh lays them
    grid = np.asarray(devices, dtype=object).reshape(dcn + ici).transpose(0, 3, 1, 4, 2, 5)
    grid = grid.reshape([outer * inner for outer, inner in zip(dcn, ici)])
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_config):
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_config.logical_axis_rules)


def shardings_of(boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves are boxed with logical axis names (unboxed leaves: replicated)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def check_divisible(abstract_tree, shardings, mesh):
  """Every sharded dimension must split evenly over its mesh axes; says which tensors do not."""
  problems = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                                    jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    for dim, axes in zip(leaf.shape, sharding.spec):
      ways = math.prod(mesh.shape[axis] for axis in jax.tree.leaves(axes))  # axes: None, a name or a tuple of names
      if dim % ways:
        problems.append(f'{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dimension {dim} over mesh axes '
                        f'{axes} ({ways} ways)')
  if problems:
    raise ShardingError('these tensors do not divide evenly over the mesh: ' + '; '.join(problems[:5]) +
                        (f' (+{len(problems) - 5} more)' if len(problems) > 5 else '') +
                        '; change config.mesh or the model shape')


def batch_sharding(mesh, rules, grad_accum_steps=1):
  """Batch dimension over data x fsdp (the 'batch' rule), sequence replicated; with gradient accumulation the step's
  batch is [k, micro-batch, length], its micro-batch axis unsharded (the step scans over it)."""
  axes = ('batch', 'length') if grad_accum_steps == 1 else (None, 'batch', 'length')
  return NamedSharding(mesh, nn.logical_to_mesh_axes(axes, rules))


def processes_sharing_batch_shards(process_ids):
  """{(data, fsdp): its processes} for the batch shards whose devices belong to more than one process; `process_ids`:
  each device's process index, an integer array shaped like the mesh [data, fsdp, tensor]."""
  process_ids = np.asarray(process_ids)
  owners = {coordinate: sorted(set(process_ids[coordinate].ravel().tolist()))
            for coordinate in np.ndindex(process_ids.shape[:2])}
  return {coordinate: processes for coordinate, processes in owners.items() if len(processes) > 1}


def check_batch_shards_per_process(mesh, process_count):
  """Each process passes its own rows to jax.make_array_from_process_local_data, which is only right when no batch
  shard (a (data, fsdp) coordinate) has devices on two processes: those would compute on different rows, silently."""
  if process_count == 1:  # also the dry run's compile-only devices, which it compiles for as one process
    return
  process_ids = np.vectorize(lambda device: device.process_index)(mesh.devices)
  shared = processes_sharing_batch_shards(process_ids)
  if shared:
    coordinate, processes = next(iter(shared.items()))
    sizes = ' '.join(f'{axis}={mesh.shape[axis]}' for axis in MESH_AXES)
    raise ShardingError(f'config.mesh {sizes} over {process_count} processes puts batch shard (data, fsdp) = '
                        f'{coordinate} on devices of processes {processes}; each process feeds its own rows, so every '
                        f'data x fsdp shard must lie within one process: keep tensor within one process\'s '
                        f'{np.sum(process_ids == processes[0])} devices and split the processes over data or fsdp')


def check_batch(global_batch, mesh, process_count, grad_accum_steps=1):
  """The micro-batch (returned) must split over the data-parallel devices and over the processes feeding them."""
  check_batch_shards_per_process(mesh, process_count)
  if global_batch % grad_accum_steps:
    raise ShardingError(f'config.train.batch_size = {global_batch} is not divisible by '
                        f'config.optimizer.grad_accum_steps = {grad_accum_steps}')
  micro, ways = global_batch // grad_accum_steps, mesh.shape['data'] * mesh.shape['fsdp']
  if micro % ways:
    raise ShardingError(f'batch of {micro} sequences (config.train.batch_size / grad_accum_steps) is not divisible '
                        f'by data x fsdp = {ways} devices; use a multiple of {ways}')
  if micro % process_count:
    raise ShardingError(f'batch of {micro} sequences is not divisible by the {process_count} processes feeding it')
  return micro


def step_batch(micro_batches, sharding):
  """One train step's global batch from this process's micro-batches: [B, T] arrays for one, [k, B, T] (the layout
  of `batch_sharding(..., k)`) for k accumulated."""
  local = micro_batches[0] if len(micro_batches) == 1 else jax.tree.map(lambda *parts: np.stack(parts), *micro_batches)
  return global_batch_from_local(local, sharding)


def global_batch_from_local(local_batch, sharding):
  """Each process passes its slice; JAX assembles the global array (multi-host input, no gather)."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)
