"""Trains a model: `python -m perijax.train --config=configs/tiny.py --workdir=DIR [--config.a.b=value ...]`.

The same command runs on every host of a pod. WORKDIR gets config.json, tokenizer.json, metrics.jsonl, tensorboard/
and checkpoints/; a workdir that already has checkpoints resumes from the latest one.
"""

import signal
import time

from absl import flags, logging
import flax.linen as nn
import grain
import jax

from perijax import checkpoint as checkpoint_lib
from perijax import cli
from perijax import config as config_lib
from perijax import hardware
from perijax import metrics as metrics_lib
from perijax import optimizer as optimizer_lib
from perijax import params as params_lib
from perijax import rundir
from perijax import runtime
from perijax import sharding as sharding_lib
from perijax import stats as stats_lib
from perijax import train_step as train_step_lib
from perijax.data import pipeline, tokenizers


def make_data_iterator(config, tokenizer, micro_batch):
  """This process's share of each global batch, as a checkpointable grain iterator."""
  kwargs = dict(seq_len=config.train.seq_len, seed=config.train.seed)
  if config.data.process_split == 'rows':  # every process packs the global stream and keeps its own rows
    return RowSlice(pipeline.make_train_iterator(config.data, tokenizer, batch_size=micro_batch, **kwargs))
  return pipeline.make_train_iterator(config.data, tokenizer, batch_size=micro_batch // jax.process_count(),
                                      process_index=jax.process_index(), process_count=jax.process_count(), **kwargs)


class RowSlice(grain.DatasetIterator):
  """Keeps this process's rows of a global-batch iterator; checkpoints (and prefetches) through it."""
  state_is_global = True  # every process iterates the same global stream: a checkpoint resumes on any process count

  def __next__(self):
    batch = next(self._parent)
    rows = batch['inputs'].shape[0] // jax.process_count()
    return {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in batch.items()}

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class Preemption:
  """SIGTERM (a preemption) asks for a checkpoint at a step boundary, then a clean exit.

  One process: a Python SIGTERM handler sets a flag. Several: the signal may reach one host only, and a save it starts
  alone hangs the rest; JAX's preemption service (jax.distributed.initialize) catches SIGTERM instead and Orbax's
  `reached_preemption` is True on every process at the same step. A Python handler would replace the service's."""

  def __init__(self):
    self.requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, 'requested', True))

  def reached(self, manager, step):
    """Called once per step by every process, with the same step: True on all of them at the same step."""
    return self.requested if jax.process_count() == 1 else manager.reached_preemption(step)


def train(config, workdir, devices=None, resume_from_intact=False):
  """Trains config.train.steps optimizer steps (resuming from WORKDIR's latest checkpoint). Returns the final state.

  `devices`: the mesh's devices; all devices of all processes by default. `resume_from_intact`: when the latest
  checkpoint is damaged, resume from the newest intact one (checkpoint.resume_step) instead of stopping.
  """
  config_lib.validate(config)
  cli.check_writable_dir(workdir)
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  rules, accum, steps = sharding_lib.logical_rules(config.mesh), config.optimizer.grad_accum_steps, config.train.steps
  micro_batch = sharding_lib.check_batch(config.train.batch_size, mesh, jax.process_count(), accum)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, steps)
  abstract_state, state_shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
  tokenizer = tokenizers.make_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(f'config.model.vocab_size = {config.model.vocab_size} is smaller than the '
                                 f'tokenizer vocabulary ({tokenizer.vocab_size}); use at least that')
  data_iterator = make_data_iterator(config, tokenizer, micro_batch)
  rundir.root(workdir).mkdir(parents=True, exist_ok=True)
  manager = checkpoint_lib.make_manager(workdir, config.checkpoint)
  latest = checkpoint_lib.resume_step(manager, workdir, resume_from_intact)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if latest is None:
      state, _ = train_step_lib.create_train_state(config, model, optimizer, mesh)
    else:
      state = checkpoint_lib.restore(manager, latest, abstract_state, state_shardings, data_iterator)
      if jax.process_index() == 0:
        print(f'resuming from the checkpoint at step {latest} in {checkpoint_lib.checkpoint_dir(workdir)}', flush=True)
  if jax.process_index() == 0:
    rundir.config_file(workdir).write_text(config.to_json_best_effort(indent=2))
    tokenizers.save_tokenizer(tokenizer, workdir)

  batch_sharding = sharding_lib.batch_sharding(mesh, rules, accum)
  step_fns = {collect: train_step_lib.jit_train_step(config, model, optimizer, state_shardings, batch_sharding, collect)
              for collect in (False, True)}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  norm_scales = jax.jit(stats_lib.norm_scales, out_shardings=replicated)  # the norms' γ, gathered whole
  tokens_per_step = config.train.batch_size * config.train.seq_len
  flops_per_token = params_lib.train_flops_per_token(config.model, config.train.seq_len)
  peak = hardware.peak_flops_for(config.train.accelerator, jax.default_backend(), jax.device_count())  # NaN: no MFU
  if (notice := hardware.mfu_notice(config.train.accelerator, jax.default_backend())) and jax.process_index() == 0:
    print(notice, flush=True)
  schedule = optimizer_lib.learning_rate_schedule(config.optimizer, steps)
  writer = metrics_lib.MetricsWriter(workdir, steps, config)
  preemption = Preemption()
  step = int(state.step)
  window_start, window_step, last_overflows, preempted = None, step, int(state.forward_overflows), False
  window, pending, compiled = [], [], set()  # device values of the steps since the last line; a line not yet written

  def write_line(logged_step, metrics, window_metrics, scales):
    """Writes a logged step's line, called once the next step is dispatched: fetching its numbers never stalls it."""
    nonlocal window_start, window_step, last_overflows
    metrics, window_metrics, scales = jax.device_get((metrics, window_metrics, scales))
    elapsed = time.time() - window_start
    tokens_per_sec = tokens_per_step * (logged_step - window_step) / elapsed if logged_step > window_step else 0.0
    record = {
        **metrics_lib.window_summary(window_metrics), 'lr': float(schedule(int(metrics['schedule_count']))),
        'loss_scale': float(metrics['loss_scale']), 'spike': bool(metrics['spike']),
        **{counter: int(metrics[counter]) for counter in train_step_lib.COUNTERS},
        'tokens_per_sec': tokens_per_sec, 'mfu': tokens_per_sec * flops_per_token / peak,
    }
    if 'stats' in metrics:
      record.update(stats_lib.layer_summary(metrics['stats']))
      record.update(stats_lib.scale_summary(scales, config.model))
    writer.write(logged_step, record)
    writer.console(logged_step, record)
    if record['forward_overflows'] > last_overflows and jax.process_index() == 0:
      print(f'forward overflow: the loss was not finite on {record["forward_overflows"] - last_overflows} '
            f'step(s) up to step {logged_step}', flush=True)
    last_overflows = record['forward_overflows']
    window_start, window_step = time.time(), logged_step

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    while step < steps:
      is_stats_step = (step + 1) % config.train.stats_every == 0 or step + 1 == steps
      compiles = is_stats_step not in compiled  # the first call of a step function compiles it
      if compiles and pending:  # no window may include a compilation: the previous line is written first
        write_line(*pending.pop())
      batch = sharding_lib.step_batch([next(data_iterator) for _ in range(accum)], batch_sharding)
      state, metrics = step_fns[is_stats_step](state, batch)
      step += 1
      window.append({key: metrics[key] for key in metrics_lib.WINDOW_KEYS})
      if compiles:  # time from the end of this step
        compiled.add(is_stats_step)
        jax.block_until_ready(state.step)
        window_start, window_step = time.time(), step
      if pending:  # the previous logged step's line, now that this step is queued behind it
        write_line(*pending.pop())
      # Step 1 is always logged: its layer_grad_norm is the snapshot at init (the last step's is the one at the end).
      if step % config.train.log_every == 0 or is_stats_step or step in (1, steps):
        scales = norm_scales(state.params) if is_stats_step else None  # γ at this step, gathered before the next
        pending, window = [(step, metrics, window, scales)], []
      if config.checkpoint.every and step % config.checkpoint.every == 0 and step < steps:
        checkpoint_lib.save(manager, step, state, data_iterator, config)
      if preempted := preemption.reached(manager, step):
        break
  if pending:
    write_line(*pending.pop())
  if manager.latest_step() != step:  # the final checkpoint, or the preempted step's
    checkpoint_lib.save(manager, step, state, data_iterator, config)
  manager.wait_until_finished()
  if preempted:
    print(f'preempted: saved the checkpoint at step {step}; exiting', flush=True)  # every host's log says so
  writer.close()
  return state


def main(argv):
  del argv   # cli.run rejects positional arguments
  logging.set_verbosity(logging.WARNING)  # Orbax and grain are chatty at INFO
  config = cli.config()
  runtime.setup(config.train)  # XLA flags and the compilation cache, before jax starts its backends
  cli.initialize_distributed()
  train(config, flags.FLAGS.workdir, resume_from_intact=flags.FLAGS.resume_from_intact)


def define_flags():
  cli.define_config_flags()
  cli.define_workdir_flag()
  cli.define_distributed_flags()
  flags.DEFINE_bool('resume_from_intact', False, 'Resume from the newest intact checkpoint when a newer one is '
                    'damaged (the damaged ones are moved to WORKDIR/checkpoints_damaged/, not deleted).')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
