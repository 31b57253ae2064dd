"""perijax's one benchmark entry: writes JSON and prints a short table.

    python benchmarks/run.py                       # CPU: the full run, a few minutes on 2 cores
    python benchmarks/run.py --smoke               # every section at toy sizes, seconds (what the test runs)
    python benchmarks/run.py --gpu                 # on a GPU: the 400M config at sequence 2048, bfloat16 and float16

CPU sections: the dense matmul rate of this machine (MFU's denominator); train tokens/s and MFU per placement and
dtype at d_model 512; the performance variants (remat policy, scan over layers) on the same config; compile time at
4 vs 48 layers with and without scan; the input pipeline's rate; the stall from feeding steps through the pipeline
and from asynchronous checkpointing; what the per-layer statistics step costs over the plain step (`stats_cost`).
Each target of the issues is checked in `targets`.
On Linux the CPU run re-executes itself once with perijax/hardware.py's CPU_GLIBC_TUNABLES (`--no_malloc_tuning`
measures without them; they are recorded in the JSON's meta).
GPU section: MFU of paper_400m (seq 2048) in bfloat16 and in float16 with dynamic loss scaling, against the accelerator
table of perijax/hardware.py (the device's peak, not a measured rate).
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import jax  # noqa: E402  pylint: disable=wrong-import-position

from configs import paper_400m, tiny  # noqa: E402  pylint: disable=wrong-import-position
import data_pipeline  # noqa: E402  pylint: disable=wrong-import-position
import train_speed  # noqa: E402  pylint: disable=wrong-import-position
from perijax import hardware  # noqa: E402  pylint: disable=wrong-import-position
from perijax import train_step as train_step_lib  # noqa: E402  pylint: disable=wrong-import-position

PLACEMENTS = ('pre', 'peri', 'post')
# The sizes of each run mode: the fixed CPU config of the training issue, and a toy version of every section.
# checkpoint_every = 100 is configs/tiny.py's own checkpoint.every (the stall at another interval scales with it).
VARIANTS = (('remat=none', {'remat': 'none'}), ('remat=full', {'remat': 'full'}),
            ('scan_layers=False', {'scan_layers': False}))
SIZES = {
    'full': dict(d_model=512, layers=4, seq_len=256, batch=4, steps=3, rounds=12, placements=PLACEMENTS,
                 dtypes=('float32', 'bfloat16'), variants=VARIANTS, compile_d_model=128, compile_depths=(4, 48),
                 compile_scan=(True, False), matmul=1024, pipeline_s=5.0, stall_steps=60, checkpoint_every=100,
                 checkpoint_rounds=4, stats_steps=3, stats_rounds=12),
    'smoke': dict(d_model=32, layers=1, seq_len=32, batch=4, steps=2, rounds=1, placements=('pre', 'peri'),
                  dtypes=('float32',), variants=(), compile_d_model=32, compile_depths=(1, 2), compile_scan=(True,),
                  matmul=128, pipeline_s=0.5, stall_steps=4, checkpoint_every=2,
                  checkpoint_rounds=2, stats_steps=1, stats_rounds=1),
}
TARGETS = {  # name: (value key, comparison, threshold, source)
    'peri_over_pre_step_time': ('<=', 1.03, 'training issue / issue 7'),
    'mfu_d512_float32': ('>=', 0.60, 'issue 7 (training issue: >= 0.50)'),
    'compile_48_over_4_with_scan': ('<=', 1.5, 'training issue'),
    'pipeline_stall': ('<', 0.05, 'issue 7'),
    'checkpoint_stall': ('<', 0.05, 'issue 7'),
}


def bench_config(d_model, layers, seq_len, batch, placement='pre', dtype='float32', data_dir=''):
  config = tiny.get_config()
  config.model.update(d_model=d_model, num_layers=layers, num_heads=max(d_model // 64, 1), compute_dtype=dtype)
  config.model.norm.placement = placement
  config.train.update(batch_size=batch, seq_len=seq_len, steps=1000)
  config.data.data_dir = data_dir
  return config


def cpu_sections(sizes, data_dir, log):
  """Every CPU measurement, as one dict."""
  s = sizes
  # The matmul rate is MFU's denominator: measured before and after the train timings and the faster kept, so one
  # slow moment of a shared machine cannot make the denominator small and the MFU large.
  rate = lambda dtype: train_speed.matmul_rate(dtype, s['matmul'])
  results = {'matmul_flops': {dtype: rate(dtype) for dtype in s['dtypes']}}
  config = lambda **kw: bench_config(s['d_model'], s['layers'], s['seq_len'], s['batch'], data_dir=data_dir, **kw)
  results['train'] = []
  for dtype in s['dtypes']:
    rows = train_speed.train_speeds([config(placement=p, dtype=dtype) for p in s['placements']], s['steps'],
                                    rounds=s['rounds'])
    results['train'] += [dict(row, placement=p, dtype=dtype, d_model=s['d_model'])
                         for p, row in zip(s['placements'], rows)]
  results['variants'] = []  # the performance knobs, each against the pre / float32 baseline timed beside it
  for name, overrides in s['variants']:
    variant = config()
    variant.model.update(overrides)
    baseline, row = train_speed.train_speeds([config(), variant], s['steps'], rounds=s['rounds'])
    results['variants'].append(dict(row, variant=name, dtype='float32',
                                    over_baseline_step_time=row['step_s'] / baseline['step_s']))
  for dtype in s['dtypes']:
    results['matmul_flops'][dtype] = max(results['matmul_flops'][dtype], rate(dtype))
    log(f"matmul {dtype}: {results['matmul_flops'][dtype] / 1e9:.1f} GFLOP/s")
  for rows in (results['train'], results['variants']):
    rows[:] = [train_speed.with_mfu(row, results['matmul_flops'][row['dtype']]) for row in rows]
  for r in results['train']:
    log(f"train {r['placement']} {r['dtype']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}")
  for r in results['variants']:
    log(f"variant {r['variant']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, "
        f"step time x{r['over_baseline_step_time']:.3f} of the baseline")

  results['compile_s'] = []
  for scan in s['compile_scan']:
    for depth in s['compile_depths']:
      compile_config = bench_config(s['compile_d_model'], depth, 64, 4)
      # One layer per scan iteration (the default): tiny's scan_unroll=4 compiles 4 layers straight, without a loop.
      compile_config.model.update(scan_layers=scan, scan_unroll=1)
      seconds = train_speed.compile_time(compile_config)
      results['compile_s'].append({'layers': depth, 'scan_layers': scan, 'seconds': seconds})
      log(f'compile {depth} layers, scan {scan}: {seconds:.1f} s')

  stall_config = tiny.get_config()  # the training issue's CPU config, whose step the pipeline must keep fed
  stall_config.data.data_dir = data_dir
  if sizes is SIZES['smoke']:
    stall_config = config()  # already compiled above
  try:
    results['pipeline'] = data_pipeline.measure(stall_config, seconds=s['pipeline_s'])
    results['pipeline_stall'] = train_speed.pipeline_stall(stall_config, s['stall_steps'])
    log(f"pipeline: {results['pipeline']['tokens_per_s']:,.0f} tokens/s; "
        f"stall {results['pipeline_stall']['stall']:+.1%}")
  except (FileNotFoundError, ValueError, OSError) as e:  # the embedded corpus is not prepared on this machine
    results['pipeline'] = results['pipeline_stall'] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
    log(f'pipeline: skipped ({results["pipeline"]["error"]})')
  results['checkpoint_stall'] = train_speed.checkpoint_stall(stall_config, s['checkpoint_every'],
                                                                s['checkpoint_rounds'])
  log(f"checkpoint every {s['checkpoint_every']} steps: stall {results['checkpoint_stall']['stall']:+.1%}")
  results['stats_cost'] = train_speed.stats_cost(stall_config, s['stats_steps'], s['stats_rounds'])
  log(f"statistics step: {results['stats_cost']['extra']:+.1%} step time, "
      f"{results['stats_cost']['amortised']:+.2%} amortised")
  results['targets'] = check_targets(results, sizes)
  return results


def check_targets(results, sizes):
  train = {(r['placement'], r['dtype']): r for r in results['train']}
  compile_s = {(r['layers'], r['scan_layers']): r['seconds'] for r in results['compile_s']}
  shallow, deep = sizes['compile_depths']
  values = {
      'peri_over_pre_step_time': train['peri', 'float32']['step_s'] / train['pre', 'float32']['step_s'],
      'mfu_d512_float32': train['pre', 'float32']['mfu'] if sizes['d_model'] == 512 else None,
      'compile_48_over_4_with_scan': compile_s[deep, True] / compile_s[shallow, True],
      'pipeline_stall': results['pipeline_stall'].get('stall'),
      'checkpoint_stall': results['checkpoint_stall']['stall'],
  }
  checks = {}
  for name, (op, threshold, source) in TARGETS.items():
    value = values[name]
    met = None if value is None else (value <= threshold if op == '<=' else value >= threshold if op == '>=' else
                                      value < threshold)
    checks[name] = {'value': value, 'target': f'{op} {threshold}', 'met': met, 'source': source}
  return checks


def gpu_accelerator_name():
  """The hardware.py name of this GPU, from its device kind (e.g. 'NVIDIA H100 80GB HBM3' -> 'h100')."""
  kind = jax.devices()[0].device_kind.lower()
  for name in hardware.ACCELERATORS:
    if name in kind.replace(' ', ''):
      return name
  raise ValueError(f'GPU {kind!r} is not in perijax/hardware.py ACCELERATORS; pass --accelerator=NAME')


def gpu_config(dtype, args):
  """paper_400m at sequence 2048 on one GPU; float16 runs with dynamic loss scaling."""
  config = paper_400m.get_config()
  config.model.update(compute_dtype=dtype, attention_impl=args.attention_impl, remat=args.remat)
  config.train.update(seq_len=2048, batch_size=args.gpu_batch, loss_scale='dynamic')
  config.mesh.update(data=1, fsdp=1, tensor=1)
  return config


def gpu_sections(args, log, make_config=gpu_config):
  """MFU of `make_config(dtype, args)` (paper_400m at sequence 2048) in bfloat16 and in float16 with dynamic loss
  scaling, on one device, against the accelerator table's peak."""
  accelerator = args.accelerator or gpu_accelerator_name()
  peak = hardware.peak_flops(accelerator)
  results = {'accelerator': accelerator, 'device_kind': jax.devices()[0].device_kind, 'peak_flops': peak, 'train': []}
  for dtype in ('bfloat16', 'float16'):
    config = make_config(dtype, args)
    row, = train_speed.train_speeds([config], args.gpu_steps, rounds=args.gpu_rounds, warmup=3, peak_flops=peak)
    row.update(dtype=dtype, loss_scaling=train_step_lib.uses_loss_scaling(config),
               batch_size=config.train.batch_size, seq_len=config.train.seq_len, remat=config.model.remat,
               attention_impl=config.model.attention_impl)
    results['train'].append(row)
    log(f"400M {dtype}: {row['tokens_per_s']:,.0f} tokens/s, MFU {row['mfu']:.1%} of {accelerator}")
  results['targets'] = {f'mfu_400m_{r["dtype"]}': {'value': r['mfu'], 'target': '>= 0.45', 'met': r['mfu'] >= 0.45,
                                                   'source': 'issue 7 (H100)'} for r in results['train']}
  return results


def table(results):
  """A short Markdown table of the headline figures."""
  lines = ['| measurement | value |', '|---|---|']
  add = lambda name, value: lines.append(f'| {name} | {value} |')
  for dtype, rate in results.get('matmul_flops', {}).items():
    add(f'dense matmul rate, {dtype}', f'{rate / 1e9:.1f} GFLOP/s')
  for r in results.get('train', []):
    label = f"train {r.get('placement', '400M')} {r['dtype']}"
    add(label, f"{r['tokens_per_s']:,.0f} tokens/s, {r['step_s'] * 1e3:.1f} ms/step, MFU {r['mfu']:.1%}")
  train = {(r.get('placement'), r['dtype']): r for r in results.get('train', [])}
  if ('pre', 'float32') in train and ('peri', 'float32') in train:
    median = lambda p: train[p, 'float32']['step_s_median']
    add('Peri / Pre step time, median rounds (the target uses the fastest)', f"{median('peri') / median('pre'):.3f}")
  for r in results.get('variants', []):
    add(f"train pre float32, {r['variant']}", f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}")
  for r in results.get('compile_s', []):
    add(f"compile, {r['layers']} layers, scan {r['scan_layers']}", f"{r['seconds']:.1f} s")
  if 'tokens_per_s' in results.get('pipeline', {}):
    add('input pipeline rate', f"{results['pipeline']['tokens_per_s']:,.0f} tokens/s")
  if 'stats_cost' in results:
    cost = results['stats_cost']
    add('statistics step vs plain step: step time, FLOPs (XLA), top_k ops in the plain step',
        f"{cost['extra']:+.1%}, x{cost['flops_ratio']:.3f}, {cost['plain']['top_k']}")
    add(f"statistics amortised over stats_every={cost['stats_every']} steps", f"{cost['amortised']:+.2%} step time")
  for name, check in results.get('targets', {}).items():
    value = '—' if check['value'] is None else f"{check['value']:.3f}"
    verdict = 'n/a' if check['met'] is None else 'met' if check['met'] else 'NOT met'
    add(f'target {name} ({check["target"]})', f'{value}: {verdict}')
  return '\n'.join(lines)


def restart_with_cpu_malloc_tuning(argv):
  """Re-executes this script once with hardware.CPU_GLIBC_TUNABLES set (glibc reads them only at process start)."""
  if platform.system() == 'Linux' and 'GLIBC_TUNABLES' not in os.environ:
    env = dict(os.environ, GLIBC_TUNABLES=hardware.CPU_GLIBC_TUNABLES)
    os.execve(sys.executable, [sys.executable, str(pathlib.Path(__file__).resolve()), *argv], env)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true', help='toy sizes: every section in seconds')
  parser.add_argument('--gpu', action='store_true', help='GPU mode: paper_400m at seq 2048, bfloat16 and float16')
  parser.add_argument('--accelerator', default='', help='GPU mode: name in perijax/hardware.py; default from device')
  parser.add_argument('--gpu_batch', type=int, default=8, help='GPU mode: sequences per step')
  parser.add_argument('--gpu_steps', type=int, default=10, help='GPU mode: timed steps per round')
  parser.add_argument('--gpu_rounds', type=int, default=3, help='GPU mode: rounds (the fastest counts)')
  parser.add_argument('--remat', default='minimal', choices=('none', 'minimal', 'full'), help='GPU mode: remat')
  parser.add_argument('--attention_impl', default='auto', choices=('xla', 'cudnn', 'auto'), help='GPU mode')
  parser.add_argument('--data_dir', default='', help="TFDS data dir of the embedded corpus ('' = TFDS default)")
  parser.add_argument('--no_malloc_tuning', action='store_true',
                      help="CPU: run without perijax/hardware.py's CPU_GLIBC_TUNABLES (to measure what they bring)")
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results.json'), help='JSON output path')
  args = parser.parse_args(argv)
  if not args.gpu and not args.no_malloc_tuning:
    restart_with_cpu_malloc_tuning(sys.argv[1:] if argv is None else argv)
  if args.gpu and jax.default_backend() != 'gpu':
    raise SystemExit(f'benchmarks/run.py --gpu: no GPU here (backend {jax.default_backend()!r})')
  if args.data_dir and not pathlib.Path(args.data_dir).is_dir():
    raise SystemExit(f'benchmarks/run.py: --data_dir={args.data_dir} is not a directory')
  log = lambda message: print(message, file=sys.stderr, flush=True)
  start = time.perf_counter()
  mode = 'gpu' if args.gpu else 'smoke' if args.smoke else 'full'
  results = gpu_sections(args, log) if args.gpu else cpu_sections(SIZES[mode], args.data_dir, log)
  results['meta'] = {'mode': mode, 'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
                     'devices_used': 1, 'cpu_count_visible': os.cpu_count(), 'jax': jax.__version__,
                     'machine': platform.machine(), 'glibc_tunables': os.environ.get('GLIBC_TUNABLES'),
                     'seconds': time.perf_counter() - start}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=2) + '\n')
  print(table(results))
  print(f'\nwrote {out}')
  return results


if __name__ == '__main__':
  main()
