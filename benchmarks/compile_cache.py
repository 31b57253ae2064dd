"""How much the persistent compilation cache (`train.compilation_cache_dir`) saves when a run starts again.

    python benchmarks/compile_cache.py [--config=configs/tiny.py] [--out=benchmarks/compile_cache.json]

Starts two fresh processes on one CPU device with an empty cache directory; each lowers and compiles the real train
step (perijax.dryrun.compile_train_step: the one perijax.train jits) after perijax.runtime.setup, as perijax.train does.
The first compiles and writes the cache, the second should read it: the JSON has both times and the second's cache hits.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


def child(config_path, cache_dir):
  """One start: runtime set-up with the cache, then the train step's compile, timed; prints a JSON line."""
  sys.path.insert(0, str(REPO))
  from perijax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_file(config_path)
  config.train.compilation_cache_dir = cache_dir
  config.mesh.update(data=1, fsdp=1, tensor=1)
  from perijax import runtime  # pylint: disable=import-outside-toplevel
  runtime.setup(config.train)
  import jax  # pylint: disable=import-outside-toplevel
  hits = []
  jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                         if event == '/jax/compilation_cache/cache_hits' else None)
  from perijax import dryrun, sharding  # pylint: disable=import-outside-toplevel
  _, _, _, seconds = dryrun.compile_train_step(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  print(json.dumps({'compile_s': seconds, 'cache_hits': len(hits),
                    'cache_dir': jax.config.jax_compilation_cache_dir}))


def measure(config_path, cache_dir, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one device
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  runs = []
  for _ in range(2):
    process = subprocess.run([sys.executable, __file__, '--child', f'--config={config_path}',
                              f'--cache_dir={cache_dir}'], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout, check=True)
    runs.append(json.loads(process.stdout.strip().splitlines()[-1]))
  files = sum(len(names) for _, _, names in os.walk(cache_dir))
  return {'config': config_path, 'cold_compile_s': runs[0]['compile_s'], 'cached_compile_s': runs[1]['compile_s'],
          'speedup': runs[0]['compile_s'] / runs[1]['compile_s'], 'cold_cache_hits': runs[0]['cache_hits'],
          'cached_cache_hits': runs[1]['cache_hits'], 'cache_files': files}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/tiny.py')
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'compile_cache.json'))
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--cache_dir', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.config, args.cache_dir)
    return
  with tempfile.TemporaryDirectory() as cache_dir:
    result = measure(args.config, cache_dir)
  pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + '\n')
  print(f"train-step compile of {result['config']}: {result['cold_compile_s']:.2f} s cold, "
        f"{result['cached_compile_s']:.2f} s from the cache ({result['speedup']:.1f}x); wrote {args.out}")


if __name__ == '__main__':
  main()
