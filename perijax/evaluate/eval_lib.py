"""Evaluation of one checkpoint (`perijax.evaluate.run` chooses which): held-out loss, per-layer statistics, zero-shot
tasks, and the files they are written to.

    evaluator = Evaluator(workdir, load_run_config(workdir))  # config, tokenizer, mesh, data, task items: all checked
    result = evaluator.evaluate(step)       # {'step', 'loss', 'perplexity', 'bits_per_byte', 'tokens', 'layers', ...}
    write_result(workdir, result)           # WORKDIR/eval/step_N.json and TensorBoard under WORKDIR/eval/tensorboard

Only the parameters are restored, on THIS process's devices: by the stored `config.mesh` when it fits them, else data
parallel with replicated parameters, so a checkpoint written on a pod slice evaluates on one host.
"""

import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from perijax import checkpoint as checkpoint_lib
from perijax import config as config_lib
from perijax import optimizer as optimizer_lib
from perijax import rundir
from perijax import sharding as sharding_lib
from perijax import stats as stats_lib
from perijax import tasks as tasks_lib
from perijax.tasks import lm_eval_results, scoring
from perijax import train_step as train_step_lib
from perijax.data import pipeline, tokenizers
from perijax.metrics import scalars
from perijax.errors import NotFoundError
from perijax.precision import Precision
from perijax.progress import progress


def _lists_to_tuples(value):
  """JSON turned the config's tuples (mesh.logical_axis_rules, eval.tasks) into lists; every config list was one."""
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(item) for item in value)
  return value


def load_run_config(workdir):
  """WORKDIR/config.json, as written by perijax.train, back into a ConfigDict."""
  path = rundir.config_file(workdir)
  if not path.is_file():
    raise NotFoundError(f'{path} does not exist: {workdir} is not a perijax training workdir (perijax.train '
                        'writes config.json there when it starts)')
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise config_lib.ConfigError(f'{path} cannot be read as JSON: {error}') from error
  if not isinstance(stored, dict) or not all(section in stored for section in ('model', 'train', 'data', 'eval')):
    raise config_lib.ConfigError(f'{path} is not a perijax config (it needs the sections model, train, data, eval)')
  # A config.json written before model.init, the norm-γ fields and eval's packed_scoring and lm_eval_results existed,
  # in today's layout, meaning what it meant then (init std model.init_std; γ from 1, learnable).
  stored = _lists_to_tuples(stored)
  model = stored['model']
  if 'init_std' in model:
    model['init'] = {'std': model.pop('init_std'), 'depth_scaled_outputs': False}
  if 'norm' in model:
    model['norm'] = {'scale_init': 1.0, 'freeze_out_scale': False, **model['norm']}
  stored['eval'] = {'packed_scoring': True, 'lm_eval_results': True, **stored['eval']}
  return ml_collections.ConfigDict(stored)


def apply_overrides(config, overrides):
  """Applies `--config.a.b=value` strings to the eval, data and mesh sections only: where and how to evaluate, not
  what was trained."""
  config_lib.apply_overrides(config, overrides, sections=('eval', 'data', 'mesh'))
  return config


def _shapes(tree):
  """{path: (shape, dtype)} of a tree of arrays or of their metadata."""
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _unreadable(step, directory, verb, error):
  """The CheckpointError for any of the many exceptions Orbax and TensorStore raise on a damaged file."""
  first = (str(error).strip().splitlines() or [''])[0].split(' See full TensorStore details')[0][:300]
  return checkpoint_lib.CheckpointError(f'checkpoint {step} in {directory} cannot be {verb} (truncated or '
                                        f'corrupted?): {type(error).__name__}: {first}')


def make_eval_mesh(config, model, devices=None):
  """(mesh, abstract params, their shardings, a description): the stored mesh if it fits these devices, else data-only
  (fsdp = tensor = 1: parameters replicated, so a model too large for one device needs the stored split's devices)."""
  devices = jax.devices() if devices is None else devices
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  fallback = ml_collections.ConfigDict(config.mesh.to_dict())
  fallback.update(data=-1, fsdp=1, tensor=1)
  batch_problem = None
  for mesh_config, kind in ((config.mesh, 'the stored config.mesh'),
                            (fallback, 'data-parallel (the stored mesh does not fit these devices)')):
    try:
      mesh = sharding_lib.make_mesh(mesh_config, devices)
      sharding_lib.check_batch_shards_per_process(mesh, jax.process_count())
      abstract, shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
    except sharding_lib.ShardingError:
      continue
    ways = mesh.shape['data'] * mesh.shape['fsdp']
    if config.eval.batch_size % ways or config.eval.batch_size % jax.process_count():
      batch_problem = (f'config.eval.batch_size = {config.eval.batch_size} must be a multiple of data x fsdp = '
                       f'{ways} devices and of the {jax.process_count()} processes; pass '
                       f'--config.eval.batch_size=<a multiple of {math.lcm(ways, jax.process_count())}>')
      continue
    return mesh, abstract.params, shardings.params, f'{kind}: ' + ' x '.join(
        f'{axis} {mesh.shape[axis]}' for axis in sharding_lib.MESH_AXES)
  raise sharding_lib.ShardingError(batch_problem or f'no evaluation mesh fits the {len(devices)} devices')


def aggregate_stats(per_batch):
  """Model statistics ({name: [layers, 2]}) of several batches as one: means averaged, RMS the root mean square, max
  |x| (and attention logits) the maximum, float16 overflows summed, massive activations the top-k of all batches."""
  combined = {}
  for name in per_batch[0]:
    if '_massive_' in name:  # top-k values and where they sit: merged below
      continue
    values = np.stack([np.asarray(stats[name], np.float64) for stats in per_batch])
    if name.endswith('_rms'):
      combined[name] = np.sqrt(np.mean(np.square(values), axis=0))
    else:
      reduce = np.max if name.endswith('_max_abs') else np.sum if name.endswith('_fp16_overflow') else np.mean
      combined[name] = reduce(values, axis=0)
  combined.update(stats_lib.merge_massive(per_batch))
  return combined


def _exp_or_inf(value):
  try:
    return math.exp(value)
  except OverflowError:  # a diverged run's loss
    return math.inf


class Evaluator:
  """Everything one workdir's evaluations share: built (and every input checked) before a checkpoint is read."""

  def __init__(self, workdir, config, devices=None):
    self.workdir = workdir
    self.config = config_lib.validate(config)
    self.tokenizer = tokenizers.load_tokenizer(workdir)
    if self.tokenizer.vocab_size > config.model.vocab_size:
      raise config_lib.ConfigError(f'config.model.vocab_size = {config.model.vocab_size} is smaller than the '
                                   f'tokenizer vocabulary ({self.tokenizer.vocab_size}) recorded in {workdir}')
    self.task_names = tasks_lib.validate_task_names(config.eval.tasks)
    self.model = train_step_lib.make_model(config)
    self.mesh, self.abstract_params, self.param_shardings, self.mesh_description = make_eval_mesh(
        config, self.model, devices)
    self.rules = sharding_lib.logical_rules(config.mesh)
    self.manager = checkpoint_lib.make_manager(workdir, read_only=True)
    # The data and every task's items are loaded now, so a missing dataset fails before any model runs.
    self.task_items = {name: tasks_lib.load_task_items(name, config.eval, config.data) for name in self.task_names}
    self.task_split_sizes = ({name: tasks_lib.split_size(name, config.eval, config.data) for name in self.task_names}
                             if config.eval.lm_eval_results else {})
    self.eval_batches = pipeline.make_eval_iterator(
        config.data, self.tokenizer, split=config.data.eval_split, seq_len=config.train.seq_len,
        batch_size=config.eval.batch_size // jax.process_count(), process_index=jax.process_index(),
        process_count=jax.process_count(), max_batches=config.data.eval_max_batches)
    if jax.process_count() > 1 and not config.data.eval_max_batches:  # every process runs the same number of steps
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      counts = multihost_utils.process_allgather(np.int32(self.eval_batches.count_batches()))
      self.eval_batches.pad_to_batches = int(np.max(counts))
    self.bytes_per_token = pipeline.bytes_per_token(config.data, self.tokenizer, config.data.eval_split)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, self.rules)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    model, loss_dtype = self.model, Precision.from_config(self.model.config).loss

    def loss_and_stats(params, batch):
      logits, stats = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                                  collect_stats=True)
      # train_step.cross_entropy's definition, summed per row: the host adds rows in float64, so the mean over
      # hundreds of thousands of tokens is not limited by a float32 running sum.
      log_probs = jax.nn.log_softmax(logits.astype(loss_dtype), axis=-1)
      nll = -jnp.take_along_axis(log_probs, batch['targets'][..., None], axis=-1)[..., 0]
      return jnp.sum(nll.astype(jnp.float32) * batch['weights'], axis=-1), jnp.sum(batch['weights'], axis=-1), stats

    def logprobs(params, inputs, positions, segment_ids):
      logits, _ = model.apply({'params': params}, inputs, positions, segment_ids)
      return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    self._norm_scales = jax.jit(stats_lib.norm_scales, out_shardings=replicated)
    self._loss_and_stats = jax.jit(loss_and_stats, in_shardings=(self.param_shardings, self.batch_sharding),
                                   out_shardings=replicated)
    # Several processes each hold only part of a batch-sharded result; the scorer reads the whole one.
    self._logprobs = jax.jit(logprobs, in_shardings=(self.param_shardings,) + (self.batch_sharding,) * 3,
                             out_shardings=self.batch_sharding if jax.process_count() == 1 else replicated)

  def steps(self):
    self.manager.reload()  # training may have written (or deleted) checkpoints since
    return list(self.manager.all_steps())

  def check_checkpoint(self, step):
    """Raises CheckpointError if `step` is damaged or its parameters are not the names, shapes and dtypes the config
    builds (read from its metadata: no array is loaded)."""
    checkpoint_lib.verify(self.manager.directory, step)  # DamagedCheckpointError: never evaluated into NaN
    try:
      metadata = ocp.PyTreeCheckpointer().metadata(rundir.checkpoint_state(self.workdir, step))
      stored = _shapes(metadata.item_metadata.tree['params'])
    except Exception as error:  # pylint: disable=broad-except
      raise _unreadable(step, self.manager.directory, 'read', error) from error
    expected = _shapes(self.abstract_params)
    problems = [f'{path} missing from the checkpoint' for path in expected if path not in stored]
    problems += [f'{path} in the checkpoint but not built by the config' for path in stored if path not in expected]
    problems += [f'{path}: checkpoint {stored[path][0]} {stored[path][1]}, config {shape} {dtype}'
                 for path, (shape, dtype) in expected.items() if path in stored and stored[path] != (shape, dtype)]
    if problems:
      raise checkpoint_lib.CheckpointError(
          f'the config does not match the parameters stored in checkpoint {step}: {"; ".join(problems[:3])}'
          + (f' (+{len(problems) - 3} more)' if len(problems) > 3 else '') + '; was config.json edited?')

  def restore(self, step):
    """The parameters of checkpoint `step` only (no optimizer state), laid out by self.param_shardings."""
    self.check_checkpoint(step)
    target = {'params': checkpoint_lib.abstract_with_shardings(self.abstract_params, self.param_shardings)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
      with jax.set_mesh(self.mesh):
        return self.manager.restore(step, args=ocp.args.Composite(state=args))['state']['params']
    except Exception as error:  # pylint: disable=broad-except
      raise _unreadable(step, self.manager.directory, 'restored', error) from error

  def evaluate(self, step):
    """The result of checkpoint `step` (the keys of `evaluate_params`, plus step); writes nothing."""
    return {'step': int(step), **self.evaluate_params(self.restore(step))}

  def evaluate_params(self, params):
    """Held-out loss, per-layer statistics and tasks for `params` (laid out by self.param_shardings)."""
    started = time.time()
    nll_sum, tokens, batch_stats = 0.0, 0.0, []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for batch in progress(self.eval_batches, 'held-out loss', total=self.eval_batches.pad_to_batches or None,
                            unit='batch'):
        batch = sharding_lib.global_batch_from_local(batch, self.batch_sharding)
        batch_nll, batch_tokens, stats = jax.device_get(self._loss_and_stats(params, batch))
        nll_sum += float(np.sum(batch_nll, dtype=np.float64))
        tokens += float(np.sum(batch_tokens, dtype=np.float64))
        if np.sum(batch_tokens) > 0:  # all-padding batches (processes kept in step) would dilute the statistics
          batch_stats.append(stats)
      if not tokens:
        raise ValueError(f'the eval split {self.config.data.eval_split!r} gave no tokens to evaluate')
      tasks = {name: scoring.score_multiple_choice(
          items, self.tokenizer, lambda *arrays: self._logprobs(params, *map(self._global, arrays)),
          batch_size=self.config.eval.batch_size, seq_len=self.config.train.seq_len, desc=name,
          packed=self.config.eval.packed_scoring)
               for name, items in self.task_items.items()}
    loss = nll_sum / tokens
    return {'loss': loss, 'perplexity': _exp_or_inf(loss), 'bits_per_byte': loss / math.log(2) / self.bytes_per_token,
            'tokens': int(round(tokens)), 'layers': stats_lib.layer_summary(aggregate_stats(batch_stats)),
            'norm_scales': stats_lib.scale_summary(jax.device_get(self._norm_scales(params)), self.config.model),
            'tasks': tasks, 'split': self.config.data.eval_split, 'bytes_per_token': self.bytes_per_token,
            'stats_batches': len(batch_stats), 'mesh': self.mesh_description, 'eval_seconds': time.time() - started}

  def _global(self, array):
    """A batch every process holds whole (the tasks' requests), as one array sharded like the training batch."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, self.batch_sharding, lambda index: array[index])


def write_result(workdir, result, lm_eval=None):
  """WORKDIR/eval/step_N.json (written whole, then renamed) and TensorBoard scalars, on process 0; `lm_eval=(config,
  task split sizes)` also writes lm-eval's results file (perijax/tasks/lm_eval_results.py) if config.eval says so."""
  if jax.process_index() != 0:
    return
  path = rundir.eval_result(workdir, result['step'])
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / (path.name + '.tmp')
  temporary.write_text(json.dumps(result, indent=2) + '\n')
  temporary.replace(path)
  if lm_eval and result['tasks'] and lm_eval[0].eval.lm_eval_results:
    lm_eval_results.write(workdir, result, *lm_eval)
  tagged = {f'eval/{key}': result[key] for key in ('loss', 'perplexity', 'bits_per_byte')}
  tagged |= {f'eval/{name}': value
             for name, value in scalars({**result['layers'], **result.get('norm_scales', {})}).items()}
  tagged |= {f'tasks/{name}/{metric}': scores[metric] for name, scores in result['tasks'].items()
             for metric in ('acc', 'acc_norm')}
  with SummaryWriter(str(rundir.eval_tensorboard(workdir))) as writer:
    for tag, value in tagged.items():
      writer.add_scalar(tag, value, result['step'])
