"""What every experiment shares: its flags, the small-scale defaults, running its grid (here, resumable, or printed
for a scheduler), the model at initialization, and writing its results.

Scale. An experiment takes `--config=` like `perijax.train`. With the default, configs/tiny.py, it first applies its
own small-scale overrides (`SMALL` in each script: fewer steps, shorter sequences, so it runs on a CPU in minutes);
with any other config (e.g. configs/paper_400m.py) it applies its `PAPER` overrides only (e.g. fewer steps than a full
30B-token run, where the question is answered sooner): sizes and dtypes come from that config and the experiment's
grid is added. `--config.a.b=value` flags override both, as for `perijax.train`.

Running. The grid is expanded and run by `perijax.sweep` (one workdir per run under --root, named by its swept values;
one `perijax.train` process per run, one after the other); a run whose final checkpoint exists is skipped and an
interrupted one resumes from its checkpoint. `--print` prints one `perijax.train && perijax.evaluate` line per run
for a pod scheduler instead; when those have run, `--analyze_only` reads their workdirs and writes the results.
"""

import dataclasses
import json
import math
import os
import platform
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `python experiments/<name>.py` as well as `python -m experiments.x`
  sys.path.insert(0, REPO)

from absl import flags  # pylint: disable=g-import-not-at-top
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from perijax import cli  # pylint: disable=g-import-not-at-top
from perijax import config as config_lib  # pylint: disable=g-import-not-at-top
from perijax import errors  # pylint: disable=g-import-not-at-top
from perijax import instability  # pylint: disable=g-import-not-at-top
from perijax import report as report_lib  # pylint: disable=g-import-not-at-top
from perijax import rundir  # pylint: disable=g-import-not-at-top
from perijax import runs as runs_lib  # pylint: disable=g-import-not-at-top
from perijax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
from perijax import stats as stats_lib  # pylint: disable=g-import-not-at-top
from perijax import sweep  # pylint: disable=g-import-not-at-top
from perijax import train_step  # pylint: disable=g-import-not-at-top

TINY_CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
RESULTS_DIR = os.path.join(REPO, 'experiments', 'results')
FLAGS = flags.FLAGS


def define_flags(name: str, seeds: int):
  """The flags every experiment has; `name` names its default run root and its results files."""
  cli.define_config_flags(default=TINY_CONFIG)   # configs/tiny.py adds this experiment's small-scale overrides
  flags.DEFINE_string('root', os.path.join('runs', 'experiments', name), 'Directory of the run workdirs.')
  flags.DEFINE_string('results', RESULTS_DIR, 'Directory the JSON and PNG results are written to.')
  flags.DEFINE_integer('seeds', seeds, 'Seeds per grid point (train.seed = 0 .. seeds-1).')
  flags.DEFINE_bool('print', False, 'Print one train && evaluate command per run (for a scheduler) and stop.')
  flags.DEFINE_bool('analyze_only', False, 'Train nothing: analyze the workdirs under --root as they are.')
  flags.DEFINE_bool('evaluate', False, 'Also run `python -m perijax.evaluate` on each finished run.')


class _NumberListParser(flags.ListParser):
  """absl's comma-separated list, each item a positive finite number of `kind` (float or int)."""

  def __init__(self, kind, example):
    super().__init__()
    self.kind, self.example = kind, example

  def parse(self, argument):
    try:
      numbers = [self.kind(item) for item in super().parse(argument)]
    except (TypeError, ValueError):
      numbers = None
    if numbers is None or not all(math.isfinite(n) and n > 0 for n in numbers):
      what = 'integers' if self.kind is int else 'numbers'
      raise ValueError(f'expected comma-separated positive {what}, e.g. {self.example}')
    return numbers


def define_number_list(name: str, default: Sequence[Any], help_text: str, kind: type = float):
  """--name=a,b,c, read as a list of positive `kind` numbers. A bad item is absl's flag error while the command line
  is read, before anything runs: the one line `experiments.<x>: error: flag --name=...: expected ...`."""
  example = ','.join(f'{kind(v):g}' for v in default[:2]) or ('4,16' if kind is int else '0.001,0.01')
  flags.DEFINE(_NumberListParser(kind, f'--{name}={example}'), name, default, help_text,
               serializer=flags.CsvListSerializer(','))


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
               small_overrides: Dict[str, Any], paper_overrides: Optional[Dict[str, Any]] = None) -> Setup:
  """The user's overrides win over the experiment's small-scale ones (configs/tiny.py only) or its paper-scale ones
  (any other config)."""
  small = is_small_scale(config_arg)
  scale_overrides = small_overrides if small else (paper_overrides or {})
  fixed = {k: v for k, v in scale_overrides.items() if k not in user_overrides}
  fixed.update(user_overrides)
  for field in fixed:
    config_lib.check_field(config, field)   # a typo in an experiment's SMALL is a clear error too
  return Setup(config_arg, config, fixed, small)


def setup_from_flags(small_overrides: Dict[str, Any], paper_overrides: Optional[Dict[str, Any]] = None) -> Setup:
  config_arg, config, user_overrides = cli.config_and_overrides()
  return make_setup(config_arg, config, user_overrides, small_overrides, paper_overrides)


def plan(setup: Setup, grid: Sequence[Tuple[str, Sequence[Any]]], seeds: int, root: str) -> List[sweep.Run]:
  """Grid × seeds -> runs (perijax.sweep's names and workdirs), every resolved config validated first."""
  specs = [f'{field}={",".join(sweep.format_value(v) for v in values)}' for field, values in grid]
  return sweep.expand_grid(setup.config, specs, seeds, root, setup.fixed, validate=config_lib.validate)


def train_runs(setup: Setup, runs: Sequence[sweep.Run], root: str, evaluate: bool = False,
               log: Callable[[str], None] = print) -> None:
  """Trains (and with `evaluate`, evaluates) each run not done yet: `perijax.sweep`'s runner, one `perijax.train`
  process after another, recorded in ROOT/sweep.json for `perijax.report`. Raises if a run failed."""
  runs = sweep.run_sweep(runs, root, setup.config_arg, setup.fixed, log=log, evaluate=evaluate)
  failed = [run for run in runs if run.status in ('failed', 'eval_failed')]
  if failed:
    raise RuntimeError(f'{len(failed)} run(s) failed: {failed[0].name}: {failed[0].detail}')


def execute(setup: Setup, runs: Sequence[sweep.Run], root: str) -> bool:
  """Prints, trains or does nothing as the flags say. Returns whether there is something to analyze."""
  if FLAGS.print:
    print('\n'.join(sweep.print_commands(runs, setup.config_arg, setup.fixed, 'python')))
    return False
  if not FLAGS.analyze_only:
    train_runs(setup, runs, root, evaluate=FLAGS.evaluate)
  missing = [run.workdir for run in runs if not rundir.metrics_files(run.workdir)]
  if missing:
    raise errors.NotFoundError(f'{len(missing)} run(s) have no metrics.jsonl yet, e.g. {missing[0]}; '
                               'train them first (drop --analyze_only)')
  return True


def load_records(runs: Sequence[sweep.Run]) -> List[runs_lib.RunRecord]:
  return [runs_lib.load_run(run.workdir, run.name) for run in runs]


def by_group(runs: Sequence[sweep.Run], records: Sequence[runs_lib.RunRecord],
             fields: Sequence[str]) -> Dict[Tuple[Any, ...], List[runs_lib.RunRecord]]:
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


def init_params(config: ml_collections.ConfigDict, seed: int, mesh):
  """The parameters `perijax.train` starts from with train.seed = seed (train_step.init_train_state's model.init),
  each created in its shard of `mesh` as config.mesh lays it out: never whole on one device."""
  model = train_step.make_model(config)
  rules = sharding_lib.logical_rules(config.mesh)
  init = lambda key: model.init(key, jnp.zeros((1, config.train.seq_len), jnp.int32))['params']
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init, jax.random.key(seed))
    shardings = sharding_lib.shardings_of(boxed, mesh, rules)
    sharding_lib.check_divisible(train_step.unboxed(boxed), shardings, mesh)
    return model, train_step.unboxed(jax.jit(init, out_shardings=shardings)(jax.random.key(seed)))


def init_layer_stats(config: ml_collections.ConfigDict, seed: int, batch_size: int,
                     output_scales: Sequence[float] = (1.0,), devices=None) -> List[Dict[str, Any]]:
  """Per-layer statistics of a freshly initialized model on random tokens (init weights are iid, so the tokens'
  statistics do not matter), once per output-projection scale. Each is layer_summary's lists plus `sublayer_var`:
  the residual variance after every sub-layer (attention 1, MLP 1, attention 2, ...), whose differences are the
  per-sub-layer increments. Runs sharded on the config's mesh over `devices` (all by default), as training does; the
  batch is rounded up to a multiple of the data-parallel ways."""
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  model, params = init_params(config, seed, mesh)
  rules = sharding_lib.logical_rules(config.mesh)
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  batch_size = -(-batch_size // ways) * ways
  tokens = jax.random.randint(jax.random.fold_in(jax.random.key(seed), 1), (batch_size, config.train.seq_len), 0,
                              min(config.model.vocab_size, 256))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  summaries = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tokens = jax.device_put(tokens, sharding_lib.batch_sharding(mesh, rules))
    forward = jax.jit(lambda p, s: model.apply({'params': scale_output_projections(p, s)}, tokens,
                                               collect_stats=True)[1], out_shardings=replicated)  # one compilation
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


# ---- seeds and spread ----------------------------------------------------------------------------------------------

def compare(a: Sequence[Any], b: Sequence[Any]) -> Dict[str, Any]:
  """Two sets of per-seed values: each as mean ± std (perijax.report.mean_std: sample std over the finite values),
  the difference of the means, and whether it exceeds the seed spread: |mean_a - mean_b| > std_a + std_b, i.e. the
  two ±1-std bands do not overlap (None when a side has fewer than 2 finite seeds, which gives no spread)."""
  a_cell, b_cell = report_lib.mean_std(a), report_lib.mean_std(b)
  difference = (a_cell['mean'] - b_cell['mean'] if a_cell['mean'] is not None and b_cell['mean'] is not None
                else None)
  exceeds = None
  if difference is not None and a_cell['std'] is not None and b_cell['std'] is not None:
    exceeds = bool(abs(difference) > a_cell['std'] + b_cell['std'])
  return {'a': a_cell, 'b': b_cell, 'difference': difference, 'exceeds_seed_spread': exceeds}


def compare_text(name_a: str, name_b: str, comparison: Dict[str, Any]) -> str:
  verdict = {True: 'exceeds the seed spread', False: 'within the seed spread', None: 'spread unknown (< 2 seeds)'}
  return (f'{name_a} {report_lib.format_mean_std(comparison["a"])} vs {name_b} '
          f'{report_lib.format_mean_std(comparison["b"])}: {verdict[comparison["exceeds_seed_spread"]]}')


def divergence(record: runs_lib.RunRecord) -> instability.Divergence:
  """perijax/instability.py's rule on a run's logged losses, with the run's own parameters."""
  lines = [line for line in record.metrics if line.get('loss') is not None]
  return instability.run_diverged([line['loss'] for line in lines], [line['step'] for line in lines], record.config)
