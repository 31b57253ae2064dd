"""Real TPU slices as compile-only devices, so a CPU host can compile for a pod (as MaxText's train_compile does).
Names are Cloud TPU's: v4 and v5p count TensorCores (two per chip, one JAX device per chip: megacore), v5e and v6e
count chips. No jax at module level: the dry run parses the name before it decides how jax starts."""

import dataclasses
import importlib.util
import math
import os
import re
import sys

# generation: (libtpu topology prefix, chip config, torus dimensions, TensorCores per device, smallest and largest
# slice in the name's unit, perijax/hardware.py accelerator, Cloud TPU accelerator-type prefix)
GENERATIONS = {
    'v4': ('v4', 'megacore', 3, 2, 8, 4096, 'tpu_v4', 'v4'),
    'v5p': ('v5', 'megacore', 3, 2, 8, 8192, 'tpu_v5p', 'v5p'),
    'v5e': ('v5e', 'default', 2, 1, 1, 256, 'tpu_v5e', 'v5litepod'),
    'v6e': ('v6e', 'default', 2, 1, 1, 256, 'tpu_v6e', 'v6e'),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                # Cloud TPU name of one slice, e.g. 'v5e-256'
  topology_name: str       # libtpu's, e.g. 'v5e:16x16'
  chip_config_name: str    # 'megacore' (v4, v5p) or 'default'
  chips_per_host_bounds: tuple
  wrap: tuple              # which torus dimensions wrap around (full-size dimensions of a pod)
  devices_per_slice: int
  num_slices: int
  accelerator: str         # the perijax/hardware.py entry, for memory and speed

  @property
  def devices(self):
    return self.devices_per_slice * self.num_slices


def parse(name, num_slices=1):
  """`Topology` of a Cloud TPU name such as 'v4-128', 'v5p-512', 'v5e-256', 'v6e-64'; ValueError (one line) if not."""
  match = re.fullmatch(r'(v4|v5p|v5e|v6e)-(\d+)', name or '')
  allowed = ('expected a Cloud TPU slice name <generation>-<size> with generation v4, v5p (size in TensorCores) or '
             'v5e, v6e (size in chips) and a power-of-two size, e.g. v4-128, v5p-512, v5e-256, v6e-64')
  if not match:
    raise ValueError(f'--topology={name!r} is not known: {allowed}')
  generation, size = match.group(1), int(match.group(2))
  prefix, chip_config, dims, cores_per_device, smallest, largest, accelerator, _ = GENERATIONS[generation]
  if size < smallest or size > largest or size & (size - 1):
    raise ValueError(f'--topology={name!r}: {generation} slices here are powers of two from {smallest} to '
                     f'{largest}; {allowed}')
  if not isinstance(num_slices, int) or num_slices < 1:
    raise ValueError(f'--num_slices={num_slices!r}: expected a positive number of slices')
  # The chips as a torus, laid out as Cloud TPU does: 2D 16 -> 4x4, 128 -> 8x16; 3D 4 -> 2x2x1, 8 -> 2x2x2, then the
  # last, middle, first dimension doubled in turn (64 -> 4x4x4, 256 -> 4x8x8).
  chips = size // cores_per_device
  if dims == 2:
    side = 2 ** (int(math.log2(chips)) // 2)
    grid = (side, chips // side)
  else:
    grid = [2, 2, min(chips // 4, 2)]
    for i in range(max(int(math.log2(chips)) - 3, 0)):
      grid[2 - i % 3] *= 2
  full = 16 if dims == 2 else 4  # a dimension this long is a full ring of the pod, so it wraps
  wrap = tuple(d >= full for d in grid) + ((False,) if dims == 2 else ())
  if dims == 3 and not all(wrap):
    wrap = (False,) * 3  # v4/v5p: only slices of whole 4x4x4 cubes are tori
  host_bounds = (2, 2, 1) if dims == 3 or chips >= 16 else (*grid, 1)  # v5e/v6e up to 8 chips: one host
  return Topology(name, f'{prefix}:' + 'x'.join(map(str, grid)), chip_config, host_bounds, wrap, chips, num_slices,
                  accelerator)


def prepare(name, num_slices):
  """Before jax starts: (Topology, True) if libtpu will compile for it; else says so in one line and returns
  (Topology, False), the caller simulating its devices on the CPU. ValueError (one line) for a bad name or count."""
  topology = parse(name, num_slices)
  if importlib.util.find_spec('libtpu') is None:
    print(f"perijax.dryrun: libtpu is not installed (pip install -e '.[tpu]'), so the TPU compiler cannot compile "
          f'for {name} x {num_slices}: simulating {topology.devices} CPU devices instead', file=sys.stderr, flush=True)
    return topology, False
  # libtpu asks the VM's metadata server for these and prints a warning for each it cannot find: set them first.
  generation, size = topology.name.split('-')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', f'{GENERATIONS[generation][7]}-{size}')
  # Compile-only: no chip is opened, so dry runs need not queue on libtpu's one-process-per-host lock file.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ['JAX_PLATFORMS'] = 'cpu'  # this host has no TPU: start no TPU backend, compile for the topology's devices
  return topology, True


def devices(topology):
  """The slices' compile-only TPU devices (libtpu required): lower and compile on them, nothing runs."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return topologies.get_topology_desc(
      platform='tpu', topology_name=topology.topology_name, chip_config_name=topology.chip_config_name,
      chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.num_slices,
      wrap=topology.wrap).devices
