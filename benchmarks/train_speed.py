"""Timing of the real train step: tokens/s and MFU, compile time, and how much the input pipeline and asynchronous
checkpointing slow the steps down. Used by benchmarks/run.py; every function builds what it times from a config.

Steps are timed the way the trainer runs them: the step jitted with the state's shardings and the old state donated,
dispatched back to back, with one `block_until_ready` at the end of the timed window (the host never waits inside it).
"""

import collections
import functools
import re
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perijax import checkpoint as checkpoint_lib
from perijax import dryrun
from perijax import hardware
from perijax import optimizer as optimizer_lib
from perijax import params as params_lib
from perijax import sharding as sharding_lib
from perijax import train_step as train_step_lib
from perijax.data import pipeline, tokenizers


class Trainer:
  """A config's model, optimizer, state and jitted step on `devices` (default: the first device only, so MFU compares
  with the matmul rate of that one device)."""

  def __init__(self, config, devices=None):
    if config.optimizer.grad_accum_steps != 1:  # it feeds one [B, T] batch per step, not the trainer's [k, B/k, T]
      raise ValueError(f'the benchmarks time one batch per step; got optimizer.grad_accum_steps = '
                       f'{config.optimizer.grad_accum_steps}, set it to 1')
    self.config = config
    self.mesh = sharding_lib.make_mesh(config.mesh, devices or jax.devices()[:1])
    self.rules = sharding_lib.logical_rules(config.mesh)
    self.model = train_step_lib.make_model(config)
    self.optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.state, shardings = train_step_lib.create_train_state(config, self.model, self.optimizer, self.mesh)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    # The trainer's two step functions: plain, and with per-layer statistics (jit is lazy: each compiles when first
    # called or lowered, so the statistics one costs nothing unless a measurement uses it).
    self.step_fns = {collect: train_step_lib.jit_train_step(config, self.model, self.optimizer, shardings,
                                                            self.batch_sharding, collect) for collect in (False, True)}

  def step(self, batch, collect_stats=False):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      self.state, metrics = self.step_fns[collect_stats](self.state, batch)
    return metrics

  def lower(self, batch, collect_stats=False):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self.step_fns[collect_stats].lower(self.state, batch)

  def put(self, local_batch):
    return sharding_lib.global_batch_from_local(local_batch, self.batch_sharding)

  def run(self, next_batch, steps, every=None, on_every=None, collect_stats=False):
    """Seconds per step over `steps` steps fed by `next_batch()`; `on_every(trainer, i)` after every `every`-th."""
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for i in range(1, steps + 1):
      self.step(next_batch(), collect_stats)
      if every and i % every == 0:
        on_every(self, i)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / steps


def synthetic_batch(config, seed=0):
  """One packed-looking batch of random tokens (what a pre-made batch feeds: no pipeline work per step)."""
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, config.train.seq_len)
  tokens = rng.integers(0, min(config.model.vocab_size, 256), size=(shape[0], shape[1] + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': np.ones(shape, np.int32),
          'positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy(),
          'weights': np.ones(shape, np.float32)}


def matmul_rate(dtype_name, size=1024):
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[dtype_name]
  return hardware.measured_matmul_flops(size=size, dtype=dtype)


_TRAINERS = {}


def trainer_for(config):
  """One Trainer per distinct config in this process: its step compiles once, whatever section times it next."""
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _TRAINERS:
    _TRAINERS[key] = Trainer(config)
  return _TRAINERS[key]


def with_mfu(row, peak_flops):
  """The row with MFU against `peak_flops` added (the one place MFU is computed from a row)."""
  return dict(row, peak_flops=peak_flops, mfu=row['model_flops_per_s'] / peak_flops)


def speed_row(config, step_s, peak_flops=None, step_s_median=None):
  tokens = config.train.batch_size * config.train.seq_len
  flops = params_lib.train_flops_per_token(config.model, config.train.seq_len) * tokens / step_s
  row = {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'model_flops_per_s': flops}
  if step_s_median is not None:
    row['step_s_median'] = step_s_median
  return with_mfu(row, peak_flops) if peak_flops else row


def interleaved_rounds(timers, rounds):
  """[[seconds per step of each round] per timer]: the `timers` (callables returning seconds per step) take turns for
  `rounds` rounds, so a slow patch of a shared machine hits every one alike."""
  times = [[] for _ in timers]
  for _ in range(rounds):
    for i, timer in enumerate(timers):
      times[i].append(timer())
  return times


def train_speeds(configs, steps, rounds=2, warmup=2, peak_flops=None):
  """[{step_s, step_s_median, tokens_per_s, model_flops_per_s, mfu}] per config, on one device.

  The configs take turns for `rounds` rounds of `steps` steps; step_s is each config's fastest round (figures derive
  from it) and step_s_median its median round. Taking turns, a slow patch of a shared machine hits every config alike
  instead of whichever happened to run during it.
  """
  trainers = [trainer_for(config) for config in configs]
  batches = [t.put(synthetic_batch(t.config)) for t in trainers]
  for trainer, batch in zip(trainers, batches):
    trainer.run(lambda b=batch: b, warmup)  # the first step compiles
  times = interleaved_rounds([functools.partial(trainer.run, lambda b=batch: b, steps)
                              for trainer, batch in zip(trainers, batches)], rounds)
  return [speed_row(config, min(t), peak_flops, float(np.median(t))) for config, t in zip(configs, times)]


def compile_time(config):
  """Seconds to lower and compile the train step (one device, abstract inputs: nothing allocated)."""
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  return dryrun.compile_train_step(config, mesh)[3]


def pipeline_stall(config, steps, warmup=2, rounds=4):
  """Step time fed from the real grain pipeline vs from one pre-made batch; stall = pipeline / pre-made - 1.

  The two take turns for `rounds` rounds of `steps` // `rounds` steps and each keeps its fastest round (as
  `train_speeds` does), so a slow patch of a shared machine does not land on one side only.
  """
  tokenizer = tokenizers.make_tokenizer(config.data)
  iterator = pipeline.make_train_iterator(config.data, tokenizer, batch_size=config.train.batch_size,
                                          seq_len=config.train.seq_len, seed=config.train.seed)
  try:
    trainer = trainer_for(config)
    fed = lambda: trainer.put(next(iterator))
    trainer.run(fed, warmup)
    premade_batch = trainer.put(next(iterator))
    premade = piped = float('inf')
    for _ in range(rounds):
      premade = min(premade, trainer.run(lambda: premade_batch, max(steps // rounds, 1)))
      piped = min(piped, trainer.run(fed, max(steps // rounds, 1)))
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()
  return {'premade_step_s': premade, 'pipeline_step_s': piped, 'stall': piped / premade - 1}


def checkpoint_stall(config, every, rounds=4, warmup=2):
  """Step time with an asynchronous Orbax checkpoint every `every` steps vs none; stall = with / without - 1.

  Rounds of `every` steps take turns: one without a save, then one that starts with a save whose write runs beside
  that round's steps (the steady state of saving every `every` steps); each side keeps its fastest round, and the
  write is waited for outside the timed windows. `save_call_s` is how long each `save` call held the host once the
  steps queued before it had finished (copying the state off the device).
  """
  trainer = trainer_for(config)
  batch = trainer.put(synthetic_batch(config))
  trainer.run(lambda: batch, warmup)
  without = with_saves = float('inf')
  blocking = []

  def save_after_first_step(t, step, checkpoint_step):
    if step != 1:
      return
    jax.block_until_ready(t.state)  # the host runs ahead of the device: do not count the queued steps as the save
    start = time.perf_counter()
    checkpoint_lib.save(manager, checkpoint_step, t.state)
    blocking.append(time.perf_counter() - start)

  with tempfile.TemporaryDirectory() as workdir:
    checkpoint_config = config.checkpoint.copy_and_resolve_references()
    checkpoint_config.async_save = True
    manager = checkpoint_lib.make_manager(workdir, checkpoint_config)
    for i in range(rounds):
      without = min(without, trainer.run(lambda: batch, every))
      save = functools.partial(save_after_first_step, checkpoint_step=i + 1)
      with_saves = min(with_saves, trainer.run(lambda: batch, every, every=1, on_every=save))
      manager.wait_until_finished()
    manager.close()
  return {'no_checkpoint_step_s': without, 'checkpoint_step_s': with_saves, 'every': every, 'rounds': rounds,
          'save_call_s': sum(blocking) / len(blocking), 'stall': with_saves / without - 1}


def program_cost(lowered):
  """XLA's FLOPs and bytes of a lowered step once compiled, and how many of each StableHLO op its program has."""
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per computation
  ops = collections.Counter(re.findall(r'= ([a-z_]+\.[a-z_.]+)', lowered.as_text()))  # every op that makes a value
  return {'flops': cost.get('flops'), 'bytes_accessed': cost.get('bytes accessed'), 'ops': sum(ops.values()),
          'top_k': ops['chlo.top_k'], 'op_counts': ops}


def stats_cost(config, steps=3, rounds=12, warmup=2):
  """What per-layer statistics cost: the trainer's plain step against its statistics step (`collect_stats=True`,
  run every `config.train.stats_every` steps), same state, same batch.

  Programs: XLA's FLOPs and bytes accessed of each compiled step, their StableHLO op counts, the ops the statistics
  add (`ops_added`: op -> extra count) and `plain_ops_beyond_stats`, the op kinds the plain step has more of (0 when
  its program is contained in the statistics one); the plain step has no `top_k` (the massive-activation search).
  Times: rounds of `steps` steps take turns, each side keeps its fastest round (median in `*_median`); `extra` is the
  statistics step's extra time, `amortised` = extra / stats_every, what statistics add to a run's average step.
  """
  trainer = trainer_for(config)
  batch = trainer.put(synthetic_batch(config))
  plain, stats = (program_cost(trainer.lower(batch, collect)) for collect in (False, True))
  plain_ops, stats_ops = plain.pop('op_counts'), stats.pop('op_counts')
  for collect in (False, True):
    trainer.run(lambda: batch, warmup, collect_stats=collect)  # compiled above; the first steps settle allocations
  plain_times, stats_times = interleaved_rounds(
      [functools.partial(trainer.run, lambda: batch, steps, collect_stats=collect) for collect in (False, True)],
      rounds)
  extra = min(stats_times) / min(plain_times) - 1
  every = config.train.stats_every
  return {'plain': plain, 'stats': stats, 'flops_ratio': stats['flops'] / plain['flops'],
          'ops_added': dict(sorted((stats_ops - plain_ops).items())),
          'plain_ops_beyond_stats': len(plain_ops - stats_ops),
          'plain_step_s': min(plain_times), 'stats_step_s': min(stats_times),
          'plain_step_s_median': float(np.median(plain_times)), 'stats_step_s_median': float(np.median(stats_times)),
          'extra': extra, 'extra_median': float(np.median(stats_times) / np.median(plain_times) - 1),
          'stats_every': every, 'amortised': extra / every, 'steps': steps, 'rounds': rounds}
