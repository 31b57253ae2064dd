"""Will a config fit on a pod, and how fast will it run? Answered on a CPU laptop, nothing allocated.

    python -m perijax.dryrun --config=configs/paper_3_2b.py --devices=256 --config.mesh.fsdp=-1 [--accelerator=h100]
    python -m perijax.dryrun --config=configs/paper_3_2b.py --topology=v5p-512 [--num_slices=2]

`--topology` (with the `tpu` extra installed: libtpu) compiles with the TPU compiler for that slice's compile-only
devices (perijax/topology.py), so memory and FLOPs are the TPU's own; without libtpu it says so and simulates as many
CPU devices. `--devices` simulates CPU devices (`--num_slices` splits them into slices). Either way it lowers and
compiles the real train step (the one `perijax.train` jits, same shardings, same donation) on abstract inputs
(`jax.ShapeDtypeStruct`), and prints per-device memory (parameters and optimizer state from their shardings;
temporaries from XLA's `memory_analysis()`), FLOPs per step (analytic and XLA's `cost_analysis()`), how each parameter
is sharded, and the step time and tokens/s on `--accelerator` at `--mfu`. A config that does not fit names its largest
per-device tensors and the meshes of the same devices that would fit.

Caveats, CPU devices only: temporaries come from the CPU compiler (its buffer assignment, and it may keep float16 work
in float32), so they approximate, not reproduce, a TPU/GPU compile; XLA's cost analysis counts a scanned layer stack's
body once.
"""

import os
import re
import sys


def _flag_value(argv, name):
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


# XLA fixes the CPU device count when jax starts, so --devices (or a --topology libtpu cannot compile for) becomes
# simulated CPU devices here, before jax is imported; with libtpu, --topology compiles for that slice's TPU devices.
_TOPOLOGY = None  # (topology.Topology, whether libtpu compiles for it)
if __name__ == '__main__' and 'jax' not in sys.modules:
  from perijax import topology as topology_lib  # imports no jax
  _DEVICES_ARG = _flag_value(sys.argv, 'devices')
  if _flag_value(sys.argv, 'topology'):
    try:
      _TOPOLOGY = topology_lib.prepare(_flag_value(sys.argv, 'topology'), _flag_value(sys.argv, 'num_slices') or '1')
    except ValueError as e:
      sys.exit(f'perijax.dryrun: error: {e}')  # the one error line of perijax.cli, before jax (and cli) start
    _DEVICES_ARG = None if _TOPOLOGY[1] else str(_TOPOLOGY[0].devices)
  if _DEVICES_ARG and _DEVICES_ARG.isdigit() and int(_DEVICES_ARG) > 0:
    _XLA_FLAGS = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
    os.environ['XLA_FLAGS'] = f'{_XLA_FLAGS.strip()} --xla_force_host_platform_device_count={_DEVICES_ARG}'.strip()
    os.environ['JAX_PLATFORMS'] = 'cpu'

# pylint: disable=wrong-import-position
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from perijax import cli  # noqa: E402
from perijax import config as config_lib  # noqa: E402
from perijax import hardware  # noqa: E402
from perijax import optimizer as optimizer_lib  # noqa: E402
from perijax import params as params_lib  # noqa: E402
from perijax import sharding as sharding_lib  # noqa: E402
from perijax import topology as topology_lib  # noqa: E402
from perijax import train_step as train_step_lib  # noqa: E402
from perijax.errors import ArgumentError  # noqa: E402

# XLA and the runtime need some device memory of their own (and fragmentation wastes some): plan with 90% of it.
USABLE_MEMORY_FRACTION = 0.9
GIB = 2 ** 30


def per_device_bytes(leaf, sharding):
  return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def sharding_leaves(shardings):
  return jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))


def tensor_rows(abstract_tree, shardings):
  """[{name, shape, spec, shard_shape, bytes}] per leaf of a state tree, `bytes` being what one device holds."""
  return [{'name': jax.tree_util.keystr(path, simple=True, separator='/'), 'shape': list(leaf.shape),
           'dtype': str(np.dtype(leaf.dtype)), 'spec': str(tuple(sharding.spec)),
           'shard_shape': list(sharding.shard_shape(leaf.shape)), 'bytes': per_device_bytes(leaf, sharding),
           'global_bytes': leaf.size * np.dtype(leaf.dtype).itemsize}
          for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree),
                                            sharding_leaves(shardings))]


def state_memory(abstract_state, shardings):
  """Per-device bytes of parameters, optimizer state and the rest of the train state, and the parameter table."""
  params = tensor_rows(abstract_state.params, shardings.params)
  opt = tensor_rows(abstract_state.opt_state, shardings.opt_state)
  rest = tensor_rows(abstract_state.replace(params=None, opt_state=None),
                     shardings.replace(params=None, opt_state=None))
  total = lambda rows, key='bytes': sum(r[key] for r in rows)
  return {'per_device': {'params_bytes': total(params), 'opt_state_bytes': total(opt), 'other_state_bytes': total(rest),
                         'state_bytes': total(params + opt + rest)},
          'params_global_bytes': total(params, 'global_bytes'), 'opt_state_global_bytes': total(opt, 'global_bytes'),
          'params': params, 'largest': sorted(params + [dict(r, name='opt_state/' + r['name']) for r in opt],
                                              key=lambda r: -r['bytes'])[:6]}


def compile_train_step(config, mesh):
  """(compiled step, abstract state, state shardings, seconds to lower + compile) for `config` on `mesh`."""
  rules = sharding_lib.logical_rules(config.mesh)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  abstract_state, shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
  # The micro-batch the jitted step sees, as shapes with the trainer's batch sharding.
  shape = (sharding_lib.check_batch(config.train.batch_size, mesh, 1, config.optimizer.grad_accum_steps),
           config.train.seq_len)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == 'weights' else jnp.int32, sharding=batch_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')}
  state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = train_step_lib.jit_train_step(config, model, optimizer, shardings, batch_sharding)
    compiled = jitted.lower(state_in, batch).compile()
  return compiled, abstract_state, shardings, time.perf_counter() - start


def mesh_candidates(device_count):
  """Every (data, fsdp, tensor) whose product is the device count."""
  for data, fsdp in itertools.product(range(1, device_count + 1), repeat=2):
    if device_count % (data * fsdp) == 0:
      yield data, fsdp, device_count // (data * fsdp)


def suggest_meshes(config, devices, budget_bytes, temp_bytes=None, measured_mesh=None, limit=5):
  """Meshes of these devices whose state fits the budget, with an estimated total per device, smallest tensor axis
  first (tensor parallelism costs communication in every layer), then least memory.

  State bytes are exact (from the shardings of that mesh); temporaries, when given from a compile on
  `measured_mesh`, are assumed split over all devices alike (activations over data x fsdp, heads and MLP over tensor),
  so they matter only when the device count differs: an estimate.
  """
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  init = functools.partial(train_step_lib.init_train_state, config=config, model=model, optimizer=optimizer)
  boxed = jax.eval_shape(init, jax.random.key(0))
  abstract = train_step_lib.unboxed(boxed)
  rules = sharding_lib.logical_rules(config.mesh)
  fits = []
  for data, fsdp, tensor in mesh_candidates(len(devices)):
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp, tensor), sharding_lib.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)  # only the shardings' shapes matter here
    try:
      shardings = sharding_lib.shardings_of(boxed, mesh, rules)
      sharding_lib.check_divisible(abstract, shardings, mesh)
      sharding_lib.check_batch(config.train.batch_size, mesh, 1, config.optimizer.grad_accum_steps)
    except sharding_lib.ShardingError:
      continue
    state = sum(map(per_device_bytes, jax.tree.leaves(abstract), sharding_leaves(shardings)))
    temp = 0 if temp_bytes is None else temp_bytes * math.prod(measured_mesh.values()) / (data * fsdp * tensor)
    if state + temp <= budget_bytes:
      fits.append({'data': data, 'fsdp': fsdp, 'tensor': tensor, 'state_bytes': state, 'temp_bytes_estimate': temp,
                   'total_bytes_estimate': state + temp})
  fits.sort(key=lambda m: (m['tensor'], m['total_bytes_estimate']))
  return fits[:limit]


def accelerator_spec(name):
  if name not in hardware.ACCELERATORS:
    raise ArgumentError(f'--accelerator={name!r} is not known; choose one of {", ".join(hardware.ACCELERATORS)} '
                     '(perijax/hardware.py)')
  peak, memory, bandwidth = hardware.ACCELERATORS[name]
  return {'name': name, 'peak_flops': peak, 'memory_bytes': memory, 'hbm_bytes_per_s': bandwidth}


def dry_run(config, accelerator='h100', mfu=0.4, suggest=True, devices=None, num_slices=None):
  """Compiles `config`'s train step for `devices` (this process's by default; `num_slices` simulated slices) and
  returns the report as a dict (see module doc). Raises ConfigError / ShardingError (one line) for a bad config or a
  mesh the model cannot be laid out on."""
  config_lib.validate(config)
  spec = accelerator_spec(accelerator)
  if not 0 < mfu <= 1:
    raise ArgumentError(f'--mfu={mfu}: expected a fraction in (0, 1], e.g. 0.4')
  devices = jax.devices() if devices is None else devices
  mesh = sharding_lib.make_mesh(config.mesh, devices, num_slices)
  compiled, abstract_state, shardings, compile_s = compile_train_step(config, mesh)
  memory = compiled.memory_analysis()
  state = state_memory(abstract_state, shardings)
  # The donated state's outputs alias its inputs, so a device holds arguments (state + batch) plus temporaries.
  total_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes
  budget = spec['memory_bytes'] * USABLE_MEMORY_FRACTION
  tokens_per_step = config.train.batch_size * config.train.seq_len
  flops_per_step = params_lib.train_flops_per_token(config.model, config.train.seq_len) * tokens_per_step
  flops_per_device = flops_per_step / len(devices)
  step_time = flops_per_device / (spec['peak_flops'] * mfu)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  report = {
      'config': {**{k: config.model[k] for k in ('d_model', 'num_layers', 'compute_dtype', 'param_dtype', 'remat',
                                                  'scan_layers')}, 'batch_size': config.train.batch_size,
                 'seq_len': config.train.seq_len, 'grad_accum_steps': config.optimizer.grad_accum_steps},
      'parameters': params_lib.count_params(config.model),
      'devices': len(devices), 'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
      'slices': num_slices or sharding_lib.slice_count(devices), 'mesh': dict(mesh.shape), 'compile_s': compile_s,
      'memory_per_device': {
          **state['per_device'], 'argument_bytes': memory.argument_size_in_bytes,
          'output_bytes': memory.output_size_in_bytes,
          'alias_bytes': memory.alias_size_in_bytes, 'temp_bytes': memory.temp_size_in_bytes,
          'total_bytes': total_bytes},
      'params_global_bytes': state['params_global_bytes'], 'opt_state_global_bytes': state['opt_state_global_bytes'],
      'flops_per_step': flops_per_step, 'flops_per_device_per_step': flops_per_device,
      'xla_flops_per_device_per_micro_step': float(cost.get('flops', float('nan'))) if cost else float('nan'),
      'accelerator': spec, 'mfu': mfu, 'step_time_s': step_time, 'tokens_per_s': tokens_per_step / step_time,
      'fits': total_bytes <= budget, 'usable_memory_bytes': budget,
      'param_sharding': state['params'], 'largest_per_device': state['largest'], 'suggested_meshes': [],
      'suggested_grad_accum_steps': None,
  }
  if not report['fits'] and suggest:
    report['suggested_meshes'] = suggest_meshes(config, devices, budget, memory.temp_size_in_bytes, dict(mesh.shape))
    report['suggested_grad_accum_steps'] = suggest_grad_accum(config, mesh, memory, budget)
  return report


def suggest_grad_accum(config, mesh, memory, budget):
  """The smallest multiple of the current gradient accumulation whose micro-batch still splits over the mesh and
  whose temporaries, scaled down with the micro-batch, fit beside the arguments; None if none does."""
  accum = config.optimizer.grad_accum_steps
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  for factor in range(2, config.train.batch_size // accum + 1):
    micro = config.train.batch_size / (accum * factor)
    if micro != int(micro) or int(micro) % ways:
      continue
    if memory.argument_size_in_bytes + memory.temp_size_in_bytes / factor <= budget:
      return accum * factor
  return None


def _gib(n):
  return f'{n / GIB:8.3f} GiB' if n >= GIB / 10 else f'{n / 2 ** 20:8.2f} MiB'


def format_report(report):
  """The report as the few tables a person reads."""
  c, m, acc, mesh = report['config'], report['memory_per_device'], report['accelerator'], report['mesh']
  lines = [
      f"dry run: {report['parameters']['total'] / 1e9:.3f}B parameters "
      f"({report['parameters']['non_embedding'] / 1e9:.3f}B non-embedding), d_model {c['d_model']}, "
      f"{c['num_layers']} layers, {c['compute_dtype']} compute, remat {c['remat']}, scan {c['scan_layers']}",
      f"mesh: data={mesh['data']} fsdp={mesh['fsdp']} tensor={mesh['tensor']} over {report['devices']} "
      f"{'simulated CPU' if report['platform'] == 'cpu' else report['device_kind']} devices in {report['slices']} "
      f"slice(s); batch {c['batch_size']} x {c['seq_len']} (grad accumulation {c['grad_accum_steps']}); "
      f"lowered + compiled in {report['compile_s']:.1f} s",
      '', 'memory per device:',
      f"  parameters        {_gib(m['params_bytes'])}   (all devices: {_gib(report['params_global_bytes'])})",
      f"  optimizer state   {_gib(m['opt_state_bytes'])}   (all devices: {_gib(report['opt_state_global_bytes'])})",
      f"  other state       {_gib(m['other_state_bytes'])}",
      f"  arguments (XLA)   {_gib(m['argument_bytes'])}   (state + batch; outputs alias the donated state)",
      f"  temporaries (XLA) {_gib(m['temp_bytes'])}   (activations, gradients, gathered weights; "
      f"{report['platform'].upper()} compiler)",
      f"  total             {_gib(m['total_bytes'])}   vs {acc['name']} {acc['memory_bytes'] / GIB:.1f} GiB "
      f"({USABLE_MEMORY_FRACTION:.0%} usable): {'FITS' if report['fits'] else 'DOES NOT FIT'}",
      '', 'compute:',
      f"  FLOPs per step     {report['flops_per_step']:.4g} (6N + attention), "
      f"{report['flops_per_device_per_step']:.4g} per device; XLA cost_analysis: "
      f"{report['xla_flops_per_device_per_micro_step']:.4g} per device per micro-step"
      + (' (scan bodies counted once)' if c['scan_layers'] else ''),
      f"  on {acc['name']} ({acc['peak_flops'] / 1e12:.0f} TFLOP/s peak) at {report['mfu']:.0%} MFU: "
      f"{report['step_time_s'] * 1e3:.4g} ms per step, {report['tokens_per_s']:,.0f} tokens/s "
      f"({report['tokens_per_s'] / report['devices']:,.0f} per device)",
      '', 'parameter sharding (per-device shape and bytes):',
  ]
  for row in report['param_sharding']:
    lines.append(f"  {row['name']:<44} {str(tuple(row['shape'])):<22} {row['spec']:<34} "
                 f"{str(tuple(row['shard_shape'])):<22} {row['bytes'] / 2 ** 20:10.2f} MiB")
  if not report['fits']:
    lines += ['', f"does not fit: {_gib(m['total_bytes'])} per device > {_gib(report['usable_memory_bytes'])} usable "
              f"on {acc['name']}; largest tensors per device:"]
    lines += [f"  {r['name']:<54} {str(tuple(r['shard_shape'])):<22} {r['bytes'] / GIB:8.3f} GiB"
              for r in report['largest_per_device']]
    lines.append(f"  temporaries                                            {m['temp_bytes'] / GIB:8.3f} GiB")
    if report['suggested_meshes']:
      lines.append('meshes of these devices that would fit (temporaries scaled from this compile: an estimate; '
                   're-run the dry run with one to check):')
      lines += [f"  --config.mesh.data={s['data']} --config.mesh.fsdp={s['fsdp']} --config.mesh.tensor={s['tensor']}"
                f"   ~{s['total_bytes_estimate'] / GIB:.2f} GiB per device" for s in report['suggested_meshes']]
    else:
      lines.append('no mesh of these devices fits: the temporaries (mostly activations, which every mesh of the same '
                   'devices splits about as finely) are too large')
    if report['suggested_grad_accum_steps']:
      lines.append(f"smaller micro-batches should fit: --config.optimizer.grad_accum_steps="
                   f"{report['suggested_grad_accum_steps']} (temporaries scale with the micro-batch: an estimate), or "
                   f"--config.model.remat=full, more devices, or an accelerator with more memory")
  return '\n'.join(lines)


def mesh_hint(config, accelerator, devices=None):
  """' (meshes of these devices that would work: ...)' for a mesh the model cannot be laid out on."""
  try:
    budget = accelerator_spec(accelerator)['memory_bytes'] * USABLE_MEMORY_FRACTION
    devices = jax.devices() if devices is None else devices
    meshes = suggest_meshes(config, devices, budget, limit=3)
  except ValueError:
    return ''
  if not meshes:
    return f' (no data x fsdp x tensor mesh of {len(devices)} devices divides this model and batch)'
  return ' (meshes of these devices that divide it and whose state fits: ' + ', '.join(
      f"data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}" for m in meshes) + ')'


def main(argv):
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  if len(argv) > 1:
    raise ArgumentError(f'unexpected arguments: {" ".join(argv[1:])}; flags take the form --name=value')
  if FLAGS.devices is not None and jax.device_count() != FLAGS.devices:
    raise ArgumentError(f'--devices={FLAGS.devices} but jax already started with {jax.device_count()} devices: run '
                        'it as `python -m perijax.dryrun` (XLA_FLAGS is set before jax is imported) and do not set '
                        '--xla_force_host_platform_device_count elsewhere')
  config = cli.config()
  accelerator = FLAGS.accelerator or ('h100' if config.train.accelerator == 'cpu' else config.train.accelerator)
  devices, num_slices = None, FLAGS.num_slices
  if _TOPOLOGY:
    accelerator = FLAGS.accelerator or _TOPOLOGY[0].accelerator
    devices = topology_lib.devices(_TOPOLOGY[0]) if _TOPOLOGY[1] else None
    num_slices = None if _TOPOLOGY[1] else num_slices  # TPU devices know their slice
  try:
    report = dry_run(config, accelerator, FLAGS.mfu, devices=devices, num_slices=num_slices)
  except sharding_lib.ShardingError as e:
    raise sharding_lib.ShardingError(f'{e}{mesh_hint(config, accelerator, devices)}') from None
  print(format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  cli.define_config_flags()
  flags.DEFINE_integer('devices', None, 'Simulated CPU devices (the pod size, >= 1); set before jax starts.',
                       lower_bound=1)
  flags.DEFINE_string('accelerator', None, 'Accelerator for memory and speed: a name in perijax/hardware.py; '
                      'default config.train.accelerator, or h100 if that is cpu.')
  flags.DEFINE_string('topology', None, 'A Cloud TPU slice to compile for, e.g. v5e-256, v4-128, v5p-512 (needs '
                      'libtpu: the tpu extra; otherwise simulated CPU devices).')
  flags.DEFINE_integer('num_slices', 1, 'Slices (joined by DCN: config.mesh.dcn_*) of --topology, or of --devices.')
  flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOPs utilisation for the step-time estimate.')
  flags.DEFINE_string('json', None, 'Also write the report as JSON to this path.')
  cli.run(main)
