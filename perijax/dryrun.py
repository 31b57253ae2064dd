"""Will a config fit on a pod, and how fast will it run? Answered on a CPU laptop, nothing allocated.

    python -m perijax.dryrun --config=configs/paper_3_2b.py --devices=256 --config.mesh.fsdp=-1 [--accelerator=h100]
    python -m perijax.dryrun --config=configs/paper_3_2b.py --topology=v5p-512 [--num_slices=2]

Compiles the real train step (the one `perijax.train` jits) on abstract inputs for simulated CPU devices, or with
libtpu for a TPU slice's compile-only devices (perijax/topology.py), and prints per-device memory, FLOPs, parameter
shardings and the step time on `--accelerator` at `--mfu`; a config that does not fit names its largest tensors and
the meshes that would fit. docs/scale.md shows the output and the caveats of the CPU compiler's figures.
"""

import os
import re
import sys

from absl import flags

FLAGS = flags.FLAGS
_TOPOLOGY = None  # (topology.Topology, whether libtpu compiles for it)
if __name__ == '__main__':
  from perijax import topology as topology_lib  # imports no jax
  flags.DEFINE_integer('devices', None, 'Simulated CPU devices (the pod size); set before jax starts.', lower_bound=1)
  flags.DEFINE_string('accelerator', None, 'For memory and speed: a name in perijax/hardware.py; default '
                      'config.train.accelerator, or h100 if that is cpu.')
  flags.DEFINE_string('topology', None, 'Cloud TPU slice to compile for, e.g. v5p-512 (with libtpu: the tpu extra).')
  flags.DEFINE_integer('num_slices', 1, 'Slices (joined by DCN: config.mesh.dcn_*) of --topology, or of --devices.')
  flags.DEFINE_float('mfu', 0.4, 'Assumed model FLOPs utilisation for the step-time estimate.')
  flags.DEFINE_string('json', None, 'Also write the report as JSON to this path.')
  # XLA fixes the CPU device count when jax starts, so --devices (or a --topology libtpu cannot compile for) becomes
  # simulated CPU devices here, before jax is imported; with libtpu, --topology compiles for that slice's TPU devices.
  try:
    FLAGS(sys.argv, known_only=True)  # this tool's flags (perijax.cli parses them all again)
    if FLAGS.topology:
      _TOPOLOGY = topology_lib.prepare(FLAGS.topology, FLAGS.num_slices)
  except (flags.Error, ValueError) as e:
    sys.exit(f'perijax.dryrun: error: {e}')  # the one error line of perijax.cli, before jax (and cli) start
  _CPU_DEVICES = FLAGS.devices
  if _TOPOLOGY:
    _CPU_DEVICES = None if _TOPOLOGY[1] else _TOPOLOGY[0].devices
  if _CPU_DEVICES:
    _XLA_FLAGS = re.sub(r'--xla_force_host_platform_device_count=\S+', '', os.environ.get('XLA_FLAGS', ''))
    os.environ['XLA_FLAGS'] = f'{_XLA_FLAGS.strip()} --xla_force_host_platform_device_count={_CPU_DEVICES}'.strip()
    os.environ['JAX_PLATFORMS'] = 'cpu'

# pylint: disable=wrong-import-position
import functools  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
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

USABLE_MEMORY_FRACTION = 0.9  # XLA and the runtime need some device memory of their own, and fragmentation wastes some
GIB = hardware.GIB


def tensor_rows(abstract_tree, shardings, prefix=''):
  """One row per leaf of a state tree: name, shape, dtype, spec, shard shape, bytes on one device and on all."""
  rows = []
  leaf_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(abstract_tree), leaf_shardings):
    shard_shape, dtype = sharding.shard_shape(leaf.shape), np.dtype(leaf.dtype)
    rows.append({'name': prefix + jax.tree_util.keystr(path, simple=True, separator='/'), 'shape': list(leaf.shape),
                 'dtype': str(dtype), 'spec': str(tuple(sharding.spec)), 'shard_shape': list(shard_shape),
                 'bytes': math.prod(shard_shape) * dtype.itemsize, 'global_bytes': leaf.size * dtype.itemsize})
  return rows


def total_bytes(rows, key='bytes'):
  return sum(row[key] for row in rows)


def compile_train_step(config, mesh):
  """(compiled step, abstract state, state shardings, seconds to lower + compile) for `config` on `mesh`."""
  rules = sharding_lib.logical_rules(config.mesh)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  abstract_state, shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
  # The batch the jitted step sees ([k, micro-batch, length] with accumulation), with the trainer's batch sharding.
  accum = config.optimizer.grad_accum_steps
  shape = (sharding_lib.check_batch(config.train.batch_size, mesh, 1, accum), config.train.seq_len)
  shape = shape if accum == 1 else (accum, *shape)
  batch_sharding = sharding_lib.batch_sharding(mesh, rules, accum)
  batch = {k: jax.ShapeDtypeStruct(shape, np.float32 if k == 'weights' else np.int32, sharding=batch_sharding)
           for k in ('inputs', 'targets', 'segment_ids', 'positions', 'weights')}
  state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = train_step_lib.jit_train_step(config, model, optimizer, shardings, batch_sharding)
    compiled = jitted.lower(state_in, batch).compile()
  return compiled, abstract_state, shardings, time.perf_counter() - start


def suggest_meshes(config, devices, budget_bytes, temp_bytes=0, limit=5):
  """Meshes of these devices whose state plus `temp_bytes` fits the budget, smallest tensor axis first (tensor
  parallelism costs communication in every layer), then least memory. State bytes are exact (from that mesh's
  shardings); `temp_bytes`, a compile's temporaries on these devices, is an estimate for every other mesh of them."""
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  boxed = jax.eval_shape(functools.partial(train_step_lib.init_train_state, config=config, model=model,
                                           optimizer=optimizer), jax.random.key(0))
  abstract, rules, count = train_step_lib.unboxed(boxed), sharding_lib.logical_rules(config.mesh), len(devices)
  fits = []
  for data, fsdp in itertools.product(range(1, count + 1), repeat=2):
    tensor = count // (data * fsdp)
    if data * fsdp * tensor != count:
      continue
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(data, fsdp, tensor), sharding_lib.MESH_AXES)
    try:
      shardings = sharding_lib.shardings_of(boxed, mesh, rules)
      sharding_lib.check_divisible(abstract, shardings, mesh)
      sharding_lib.check_batch(config.train.batch_size, mesh, 1, config.optimizer.grad_accum_steps)
    except sharding_lib.ShardingError:
      continue
    state = total_bytes(tensor_rows(abstract, shardings))
    if state + temp_bytes <= budget_bytes:
      fits.append({'data': data, 'fsdp': fsdp, 'tensor': tensor, 'state_bytes': state,
                   'temp_bytes_estimate': temp_bytes, 'total_bytes_estimate': state + temp_bytes})
  return sorted(fits, key=lambda m: (m['tensor'], m['total_bytes_estimate']))[:limit]


def suggest_grad_accum(config, mesh, memory, budget):
  """The smallest multiple of the gradient accumulation whose micro-batch still splits over the mesh and whose
  temporaries, scaled down with the micro-batch, fit beside the arguments; None if none does."""
  accum, batch = config.optimizer.grad_accum_steps, config.train.batch_size
  for factor in range(2, batch // accum + 1):
    micro, remainder = divmod(batch, accum * factor)
    splits = not remainder and micro % (mesh.shape['data'] * mesh.shape['fsdp']) == 0
    if splits and memory.argument_size_in_bytes + memory.temp_size_in_bytes / factor <= budget:
      return accum * factor
  return None


def accelerator_spec(name):
  if name not in hardware.ACCELERATORS:
    raise ArgumentError(f'--accelerator={name!r} is not known; choose one of {", ".join(hardware.ACCELERATORS)} '
                        '(perijax/hardware.py)')
  peak, memory, bandwidth = hardware.ACCELERATORS[name]
  return {'name': name, 'peak_flops': peak, 'memory_bytes': memory, 'hbm_bytes_per_s': bandwidth}


def dry_run(config, accelerator='h100', mfu=0.4, devices=None, num_slices=None):
  """The report (a dict) of `config`'s train step compiled for `devices` (default: this process's; `num_slices`
  simulated slices). ConfigError / ShardingError (one line, naming meshes that would work) for a bad config or mesh."""
  config_lib.validate(config)
  spec = accelerator_spec(accelerator)
  if not 0 < mfu <= 1:
    raise ArgumentError(f'--mfu={mfu}: expected a fraction in (0, 1], e.g. 0.4')
  devices = jax.devices() if devices is None else devices
  budget = spec['memory_bytes'] * USABLE_MEMORY_FRACTION
  try:
    mesh = sharding_lib.make_mesh(config.mesh, devices, num_slices)
    compiled, abstract_state, shardings, compile_s = compile_train_step(config, mesh)
  except sharding_lib.ShardingError as e:
    try:
      meshes = ', '.join(f"data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}"
                         for m in suggest_meshes(config, devices, budget, limit=3))
    except ValueError:   # no hint rather than losing the one-line error it would explain
      raise e from None
    hint = (f'meshes of these devices that divide it and whose state fits: {meshes}' if meshes else
            f'no data x fsdp x tensor mesh of {len(devices)} devices divides this model and batch')
    raise sharding_lib.ShardingError(f'{e} ({hint})') from None
  memory = compiled.memory_analysis()
  params = tensor_rows(abstract_state.params, shardings.params)
  opt = tensor_rows(abstract_state.opt_state, shardings.opt_state, prefix='opt_state/')
  rest = tensor_rows(abstract_state.replace(params=None, opt_state=None),
                     shardings.replace(params=None, opt_state=None))
  # The donated state's outputs alias its inputs, so a device holds arguments (state + batch) plus temporaries.
  device_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes
  tokens_per_step = config.train.batch_size * config.train.seq_len
  flops_per_step = params_lib.train_flops_per_token(config.model, config.train.seq_len) * tokens_per_step
  step_time = flops_per_step / len(devices) / (spec['peak_flops'] * mfu)
  fits = device_bytes <= budget
  return {
      'config': {**{k: config.model[k] for k in ('d_model', 'num_layers', 'compute_dtype', 'param_dtype', 'remat',
                                                  'scan_layers')}, 'batch_size': config.train.batch_size,
                 'seq_len': config.train.seq_len, 'grad_accum_steps': config.optimizer.grad_accum_steps},
      'parameters': params_lib.count_params(config.model),
      'devices': len(devices), 'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
      'slices': num_slices or sharding_lib.slice_count(devices), 'mesh': dict(mesh.shape), 'compile_s': compile_s,
      'memory_per_device': {
          'params_bytes': total_bytes(params), 'opt_state_bytes': total_bytes(opt),
          'other_state_bytes': total_bytes(rest), 'state_bytes': total_bytes(params + opt + rest),
          'argument_bytes': memory.argument_size_in_bytes, 'output_bytes': memory.output_size_in_bytes,
          'alias_bytes': memory.alias_size_in_bytes, 'temp_bytes': memory.temp_size_in_bytes,
          'total_bytes': device_bytes},
      'params_global_bytes': total_bytes(params, 'global_bytes'),
      'opt_state_global_bytes': total_bytes(opt, 'global_bytes'),
      'flops_per_step': flops_per_step, 'flops_per_device_per_step': flops_per_step / len(devices),
      'xla_flops_per_device_per_micro_step': float((compiled.cost_analysis() or {}).get('flops', float('nan'))),
      'accelerator': spec, 'mfu': mfu, 'step_time_s': step_time, 'tokens_per_s': tokens_per_step / step_time,
      'fits': fits, 'usable_memory_bytes': budget, 'param_sharding': params,
      'largest_per_device': sorted(params + opt, key=lambda r: -r['bytes'])[:6],
      'suggested_meshes': [] if fits else suggest_meshes(config, devices, budget, memory.temp_size_in_bytes),
      'suggested_grad_accum_steps': None if fits else suggest_grad_accum(config, mesh, memory, budget),
  }


def _size(n):
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
      f"  parameters        {_size(m['params_bytes'])}   (all devices: {_size(report['params_global_bytes'])})",
      f"  optimizer state   {_size(m['opt_state_bytes'])}   (all devices: {_size(report['opt_state_global_bytes'])})",
      f"  other state       {_size(m['other_state_bytes'])}",
      f"  arguments (XLA)   {_size(m['argument_bytes'])}   (state + batch; outputs alias the donated state)",
      f"  temporaries (XLA) {_size(m['temp_bytes'])}   (activations, gradients, gathered weights; "
      f"{report['platform'].upper()} compiler)",
      f"  total             {_size(m['total_bytes'])}   vs {acc['name']} {acc['memory_bytes'] / GIB:.1f} GiB "
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
  lines += [f"  {r['name']:<44} {str(tuple(r['shape'])):<22} {r['spec']:<34} {str(tuple(r['shard_shape'])):<22} "
            f"{r['bytes'] / 2 ** 20:10.2f} MiB" for r in report['param_sharding']]
  if report['fits']:
    return '\n'.join(lines)
  lines += ['', f"does not fit: {_size(m['total_bytes'])} per device > {_size(report['usable_memory_bytes'])} usable "
            f"on {acc['name']}; largest tensors per device:"]
  lines += [f"  {r['name']:<54} {str(tuple(r['shard_shape'])):<22} {r['bytes'] / GIB:8.3f} GiB"
            for r in report['largest_per_device']]
  lines.append(f"  {'temporaries':<77} {m['temp_bytes'] / GIB:8.3f} GiB")
  if report['suggested_meshes']:
    lines.append('meshes of these devices that would fit (temporaries from this compile: an estimate; re-run the dry '
                 'run with one to check):')
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


def main(argv):
  del argv   # cli.run rejects positional arguments
  if FLAGS.devices is not None and jax.device_count() != FLAGS.devices:
    raise ArgumentError(f'--devices={FLAGS.devices} but jax already started with {jax.device_count()} devices: run '
                        'it as `python -m perijax.dryrun` (XLA_FLAGS is set before jax is imported) and do not set '
                        '--xla_force_host_platform_device_count elsewhere')
  config = cli.config()
  default = 'h100' if config.train.accelerator == 'cpu' else config.train.accelerator
  accelerator = FLAGS.accelerator or (_TOPOLOGY[0].accelerator if _TOPOLOGY else default)
  devices, num_slices = None, FLAGS.num_slices
  if _TOPOLOGY and _TOPOLOGY[1]:  # libtpu's compile-only devices know their slices
    devices, num_slices = topology_lib.devices(_TOPOLOGY[0]), None
  report = dry_run(config, accelerator, FLAGS.mfu, devices=devices, num_slices=num_slices)
  print(format_report(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=2)


if __name__ == '__main__':
  cli.define_config_flags()
  cli.run(main)
