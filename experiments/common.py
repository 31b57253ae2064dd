"""What every experiment shares: its flags, the small-scale defaults, running its grid (here, resumable, or printed
for a scheduler), the model at initialization, and writing its results.

Scale. An experiment takes `--config=` like `perijax.train`. With the default, configs/tiny.py, it first applies its
own small-scale overrides (`SMALL` in each script: fewer steps, shorter sequences, so it runs on a CPU in minutes);
with any other config (e.g. configs/paper_400m.py) it applies none: steps, sizes and dtypes come from that config and
only the experiment's grid is added. `--config.a.b=value` flags override both, as for `perijax.train`.

Running. The grid is expanded by `perijax.sweep` (one workdir per run under --root, named by its swept values) and
trained in this process, one run after the other; a run whose final checkpoint exists is skipped and an interrupted
one resumes from its checkpoint. `--print` prints one `perijax.train && perijax.evaluate` line per run for a pod
scheduler instead; when those have run, `--analyze_only` reads their workdirs and writes the results.
"""

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python experiments/<name>.py` as well as `python -m experiments.x`
  sys.path.insert(0, REPO)

from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from perijax import config as config_lib  # pylint: disable=g-import-not-at-top
from perijax import inspect as inspect_lib  # pylint: disable=g-import-not-at-top
from perijax import stats as stats_lib  # pylint: disable=g-import-not-at-top
from perijax import sweep  # pylint: disable=g-import-not-at-top
from perijax import train_step  # pylint: disable=g-import-not-at-top

TINY_CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
RESULTS_DIR = os.path.join(REPO, 'experiments', 'results')
FLAGS = flags.FLAGS


def define_flags(name: str, seeds: int):
  """The flags every experiment has; `name` names its default run root and its results files."""
  # --config defaults to configs/tiny.py (which adds this experiment's small-scale overrides).
  config_flags.DEFINE_config_file('config', TINY_CONFIG, 'Config file of every run; --config.a.b=value overrides.',
                                  lock_config=True)
  flags.DEFINE_string('root', os.path.join('runs', 'experiments', name), 'Directory of the run workdirs.')
  flags.DEFINE_string('results', RESULTS_DIR, 'Directory the JSON and PNG results are written to.')
  flags.DEFINE_integer('seeds', seeds, 'Seeds per grid point (train.seed = 0 .. seeds-1).')
  flags.DEFINE_bool('print', False, 'Print one train && evaluate command per run (for a scheduler) and stop.')
  flags.DEFINE_bool('analyze_only', False, 'Train nothing: analyze the workdirs under --root as they are.')
  flags.DEFINE_bool('evaluate', False, 'Also run `python -m perijax.evaluate` on each finished run.')


@dataclasses.dataclass
class Setup:
  """The loaded config and the overrides every run of the experiment gets."""
  config_arg: str                 # as given to --config, for printed commands
  config: ml_collections.ConfigDict
  fixed: Dict[str, Any]           # small-scale overrides (tiny.py only) then the user's --config.x=... overrides
  small_scale: bool

  def resolved(self, overrides: Optional[Dict[str, Any]] = None) -> ml_collections.ConfigDict:
    return sweep.resolve(self.config, {**self.fixed, **(overrides or {})})


def is_small_scale(config_arg: str) -> bool:
  return os.path.basename(config_arg.split(':', 1)[0]) == os.path.basename(TINY_CONFIG)


def make_setup(config_arg: str, config: ml_collections.ConfigDict, user_overrides: Dict[str, Any],
               small_overrides: Dict[str, Any]) -> Setup:
  """The user's overrides win over the experiment's small-scale ones, which apply only to configs/tiny.py."""
  small = is_small_scale(config_arg)
  fixed = {k: v for k, v in small_overrides.items() if small and k not in user_overrides}
  fixed.update(user_overrides)
  for field in fixed:
    config_lib.check_field(config, field)   # a typo in an experiment's SMALL is a clear error too
  return Setup(config_arg, config, fixed, small)


def setup_from_flags(small_overrides: Dict[str, Any]) -> Setup:
  config_arg = config_flags.get_config_filename(FLAGS['config'])
  return make_setup(config_arg, FLAGS.config, config_flags.get_override_values(FLAGS['config']), small_overrides)


def plan(setup: Setup, grid: Sequence[Tuple[str, Sequence[Any]]], seeds: int, root: str) -> List[sweep.Run]:
  """Grid × seeds -> runs (perijax.sweep's names and workdirs), every resolved config validated first."""
  specs = [f'{field}={",".join(sweep.format_value(v) for v in values)}' for field, values in grid]
  return sweep.expand_grid(setup.config, specs, seeds, root, setup.fixed, validate=config_lib.validate)


def is_trained(run: sweep.Run) -> bool:
  return sweep.latest_checkpoint_step(run.workdir) == run.steps


def train_runs(setup: Setup, runs: Sequence[sweep.Run], root: str, evaluate: bool = False,
               log: Callable[[str], None] = print) -> None:
  """Trains each run not trained yet, in this process; records them in ROOT/sweep.json for `perijax.inspect`."""
  from perijax import train  # pylint: disable=g-import-not-at-top  (defines absl flags: only imported when needed)
  logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO, as in perijax.train's main
  os.makedirs(root, exist_ok=True)
  header = {'config': setup.config_arg, 'fixed_overrides': setup.fixed}
  for index, run in enumerate(runs, 1):
    start = time.time()
    if is_trained(run):
      run.status = 'skipped'
    else:
      train.train(setup.resolved(run.overrides), run.workdir)
      run.status = 'trained'
    if evaluate and not sweep.is_finished(run):
      status = sweep.subprocess_run_command(sweep.evaluate_command(run.workdir, run.steps, sys.executable),
                                            os.path.join(run.workdir, 'eval.log'))
      run.detail = '' if status == 0 else f'perijax.evaluate exited with {status}; see {run.workdir}/eval.log'
    log(f'[{index}/{len(runs)}] {run.name}: {run.status} ({time.time() - start:.0f}s) {run.detail}'.rstrip())
    sweep.write_sweep_json(root, runs, header)


def execute(setup: Setup, runs: Sequence[sweep.Run], root: str) -> bool:
  """Prints, trains or does nothing as the flags say. Returns whether there is something to analyze."""
  if FLAGS.print:
    print('\n'.join(sweep.print_commands(runs, setup.config_arg, setup.fixed, 'python')))
    return False
  if not FLAGS.analyze_only:
    train_runs(setup, runs, root, evaluate=FLAGS.evaluate)
  missing = [run.workdir for run in runs if not os.path.exists(os.path.join(run.workdir, 'metrics.jsonl'))]
  if missing:
    raise FileNotFoundError(f'{len(missing)} run(s) have no metrics.jsonl yet, e.g. {missing[0]}; '
                            'train them first (drop --analyze_only)')
  return True


def load_records(runs: Sequence[sweep.Run]) -> List[inspect_lib.RunRecord]:
  return [inspect_lib.load_run(run.workdir, run.name) for run in runs]


def by_group(runs: Sequence[sweep.Run], records: Sequence[inspect_lib.RunRecord],
             fields: Sequence[str]) -> Dict[Tuple[Any, ...], List[inspect_lib.RunRecord]]:
  """Records grouped by the values of `fields` (every swept field but the seed), in grid order."""
  groups = {}
  for run, record in zip(runs, records):
    groups.setdefault(tuple(run.overrides[f] for f in fields), []).append(record)
  return groups


# ---- the model at initialization -------------------------------------------------------------------------------

def scale_output_projections(params, scale):
  """Multiplies every sub-layer's output projection (attention `out`, MLP `down`) by `scale` (docs/paper.md claim 1's
  direct test: Pre-LN's variance increment should scale by scale², Peri-LN's should not move)."""
  def scaled(path, leaf):
    keys = [getattr(p, 'key', None) for p in path]
    is_output = ('attention' in keys and 'out' in keys) or ('mlp' in keys and 'down' in keys)
    return leaf * jnp.asarray(scale).astype(leaf.dtype) if is_output else leaf
  return jax.tree_util.tree_map_with_path(scaled, params)


def init_layer_stats(config: ml_collections.ConfigDict, seed: int, batch_size: int,
                     output_scales: Sequence[float] = (1.0,)) -> List[Dict[str, Any]]:
  """Per-layer statistics of a freshly initialized model on random tokens (init weights are iid, so the tokens'
  statistics do not matter), once per output-projection scale. Each is layer_summary's lists plus `sublayer_var`:
  the residual variance after every sub-layer (attention 1, MLP 1, attention 2, ...), whose differences are the
  per-sub-layer increments."""
  model = train_step.make_model(config)
  # The same parameters as `perijax.train` starts from with train.seed = seed (train_step.init_train_state).
  params = model.init(jax.random.key(seed), jnp.zeros((1, config.train.seq_len), jnp.int32))
  params = train_step.unboxed(params)['params']
  tokens = jax.random.randint(jax.random.fold_in(jax.random.key(seed), 1), (batch_size, config.train.seq_len), 0,
                              min(config.model.vocab_size, 256))
  forward = jax.jit(lambda p, s: model.apply({'params': scale_output_projections(p, s)}, tokens,
                                             collect_stats=True)[1])  # one compilation for every scale
  summaries = []
  for scale in output_scales:
    stats = jax.device_get(forward(params, jnp.float32(scale)))
    summary = stats_lib.layer_summary(stats)
    summary['sublayer_var'] = np.asarray(stats['residual_var'], np.float64).reshape(-1).tolist()
    summaries.append(summary)
  return summaries


# ---- results ---------------------------------------------------------------------------------------------------

def settings(setup: Setup, grid: Sequence[Tuple[str, Sequence[Any]]], seeds: int, root: str) -> Dict[str, Any]:
  """What a reader needs to reproduce the numbers: config, overrides, grid, seeds, sizes, machine."""
  config = setup.resolved()
  return {
      'config': os.path.relpath(setup.config_arg.split(':', 1)[0], REPO), 'small_scale': setup.small_scale,
      'fixed_overrides': setup.fixed, 'grid': {field: list(values) for field, values in grid}, 'seeds': seeds,
      'root': root, 'model': {k: config.model[k] for k in ('d_model', 'num_layers', 'num_heads', 'compute_dtype',
                                                             'param_dtype')},
      'train': {k: config.train[k] for k in ('steps', 'batch_size', 'seq_len', 'stats_every', 'spike_factor',
                                             'spike_window')},
      'optimizer_lr': config.optimizer.lr, 'data': config.data.name,
      'tokens_per_run': config.train.steps * config.train.batch_size * config.train.seq_len,
      'machine': f'{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}',
  }


def write_json(results_dir: str, name: str, data: Dict[str, Any]) -> str:
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, f'{name}.json')
  with open(path, 'w') as f:
    json.dump(data, f, indent=1, default=float)
  return path


def finite_or_none(value):
  return None if value is None or not np.isfinite(value) else float(value)
