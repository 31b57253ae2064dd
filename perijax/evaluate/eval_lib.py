"""Evaluation of one checkpoint: the run's config, its parameters, held-out loss, per-layer statistics, zero-shot tasks
and the files they are written to. `perijax.evaluate.run` chooses the checkpoints; this module does the work.

    evaluator = Evaluator(workdir, load_run_config(workdir))  # config, tokenizer, mesh, data, task items: all checked
    evaluator.check_checkpoint(step)        # shapes and dtypes on disk == what the stored config builds
    result = evaluator.evaluate(step)       # {'step', 'loss', 'perplexity', 'bits_per_byte', 'tokens', 'layers', ...}
    write_result(workdir, result)           # WORKDIR/eval/step_N.json and TensorBoard under WORKDIR/eval/tensorboard

Evaluation reads parameters only (a partial Orbax restore: no optimizer state), laid out on a mesh of THIS process's
devices: the stored `config.mesh` when it fits them, else pure data parallelism (data = every device, fsdp = tensor = 1,
parameters replicated), so a checkpoint written on a pod slice evaluates on one host.
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

# ---- the run's config -------------------------------------------------------------------------------------------

def _lists_to_tuples(value):
  """JSON turned the config's tuples (mesh.logical_axis_rules, eval.tasks) into lists; every config list was a tuple."""
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
  return ml_collections.ConfigDict(_upgrade(_lists_to_tuples(stored)))


def _upgrade(stored):
  """A config.json written before model.init and the norm-γ fields existed, in today's layout, meaning what it meant
  then (a plain init of std model.init_std; γ from 1, learnable)."""
  model = stored['model']
  if 'init_std' in model:
    model['init'] = {'std': model.pop('init_std'), 'depth_scaled_outputs': False}
  if 'norm' in model:
    model['norm'] = {'scale_init': 1.0, 'freeze_out_scale': False, **model['norm']}
  return stored


def apply_overrides(config, overrides):
  """Applies `--config.a.b=value` strings (the `--config.` prefix optional) to the eval, data and mesh sections only:
  they say where and how to evaluate, not what was trained."""
  config_lib.apply_overrides(config, overrides, sections=('eval', 'data', 'mesh'))
  return config


# ---- the checkpoint ---------------------------------------------------------------------------------------------

def _shapes(tree):
  """{path: (shape, dtype)} of a tree of arrays or of their metadata."""
  return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def stored_param_metadata(workdir, step):
  """{path: (shape, dtype)} of the parameters in checkpoint `step`, read from its metadata (no array is loaded)."""
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(rundir.checkpoint_state(workdir, step))
    return _shapes(metadata.item_metadata.tree['params'])
  except Exception as error:  # pylint: disable=broad-except  Orbax/tensorstore raise many kinds for a damaged file
    raise checkpoint_lib.CheckpointError(
        f'checkpoint {step} in {checkpoint_lib.checkpoint_dir(workdir)} cannot be read (truncated or corrupted?): '
        f'{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ""}') from error


def check_params_match(stored, abstract_params, step):
  """The stored parameters must be exactly the ones the config builds: same names, shapes and dtypes."""
  expected = _shapes(abstract_params)
  problems = [f'{path} missing from the checkpoint' for path in expected if path not in stored]
  problems += [f'{path} in the checkpoint but not built by the config' for path in stored if path not in expected]
  problems += [f'{path}: checkpoint {stored[path][0]} {stored[path][1]}, config {shape} {dtype}'
               for path, (shape, dtype) in expected.items() if path in stored and stored[path] != (shape, dtype)]
  if problems:
    raise checkpoint_lib.CheckpointError(
        f'the config does not match the parameters stored in checkpoint {step}: {"; ".join(problems[:3])}'
        + (f' (+{len(problems) - 3} more)' if len(problems) > 3 else '') + '; was config.json edited?')


def restore_params(manager, step, abstract_params, shardings):
  """The parameters of checkpoint `step` only (no optimizer state), each array laid out by `shardings`."""
  target = {'params': checkpoint_lib.abstract_with_shardings(abstract_params, shardings)}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=True)
  try:
    return manager.restore(step, args=ocp.args.Composite(state=args))['state']['params']
  except Exception as error:  # pylint: disable=broad-except  a damaged file surfaces as any of several kinds
    lines = str(error).strip().splitlines() or ['']
    first = lines[0].split(' See full TensorStore details')[0][:300]
    raise checkpoint_lib.CheckpointError(f'checkpoint {step} in {manager.directory} cannot be restored (truncated '
                                         f'or corrupted?): {type(error).__name__}: {first}') from error


# ---- the mesh ---------------------------------------------------------------------------------------------------

def make_eval_mesh(config, model, devices=None):
  """(mesh, abstract params, their shardings, a description): the stored mesh if it fits these devices, else data-only.

  The fallback replicates the parameters on every device (fsdp = tensor = 1); a model too large for one device needs
  an evaluation job with enough devices for the stored split.
  """
  devices = jax.devices() if devices is None else devices
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  fallback = ml_collections.ConfigDict(config.mesh.to_dict())
  fallback.update(data=-1, fsdp=1, tensor=1)
  batch_problem = None
  candidates = ((config.mesh, 'the stored config.mesh'),
                (fallback, 'data-parallel (the stored mesh does not fit these devices)'))
  for mesh_config, kind in candidates:
    try:
      mesh = sharding_lib.make_mesh(mesh_config, devices)
      abstract, shardings = train_step_lib.abstract_train_state(config, model, optimizer, mesh)
    except sharding_lib.ShardingError:
      continue
    ways = mesh.shape['data'] * mesh.shape['fsdp']
    if config.eval.batch_size % ways or config.eval.batch_size % jax.process_count():
      batch_problem = (f'config.eval.batch_size = {config.eval.batch_size} must be a multiple of data x fsdp = '
                       f'{ways} devices and of the {jax.process_count()} processes; pass '
                       f'--config.eval.batch_size=<a multiple of {math.lcm(ways, jax.process_count())}>')
      continue
    description = f'{kind}: ' + ' x '.join(f'{axis} {mesh.shape[axis]}' for axis in sharding_lib.MESH_AXES)
    return mesh, abstract.params, shardings.params, description
  raise sharding_lib.ShardingError(batch_problem or f'no evaluation mesh fits the {len(devices)} devices')


# ---- the numbers ------------------------------------------------------------------------------------------------

def aggregate_stats(per_batch):
  """Model statistics ({name: [layers, 2]}) of several batches -> one set: variances averaged, RMS as the root of the
  mean square, max |x| (and the largest attention logit) the maximum, float16 overflows summed, massive activations
  the top-k of all batches (their median |x| averaged)."""
  combined = {}
  for name in per_batch[0]:
    if '_massive_' in name:  # top-k values and where they sit: merged below
      continue
    values = np.stack([np.asarray(stats[name], np.float64) for stats in per_batch])
    if name.endswith('_max_abs'):
      combined[name] = values.max(axis=0)
    elif name.endswith('_fp16_overflow'):
      combined[name] = values.sum(axis=0)
    elif name.endswith('_rms'):
      combined[name] = np.sqrt(np.mean(np.square(values), axis=0))
    else:
      combined[name] = values.mean(axis=0)
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
                             if config.eval.get('lm_eval_results', True) else {})
    self.eval_batches = pipeline.make_eval_iterator(
        config.data, self.tokenizer, split=config.data.eval_split,
        batch_size=config.eval.batch_size // jax.process_count(), seq_len=config.train.seq_len,
        process_index=jax.process_index(), process_count=jax.process_count(),
        max_batches=config.data.eval_max_batches)
    if jax.process_count() > 1 and not config.data.eval_max_batches:  # every process runs the same number of steps
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      counts = multihost_utils.process_allgather(np.int32(self.eval_batches.count_batches()))
      self.eval_batches.pad_to_batches = int(np.max(counts))
    self.bytes_per_token = pipeline.bytes_per_token(config.data, self.tokenizer, config.data.eval_split)
    self._build_functions()

  def _build_functions(self):
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
      weights = batch['weights']
      return jnp.sum(nll.astype(jnp.float32) * weights, axis=-1), jnp.sum(weights, axis=-1), stats

    def logprobs(params, inputs, positions, segment_ids):
      logits, _ = model.apply({'params': params}, inputs, positions, segment_ids)
      return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    self._norm_scales = jax.jit(stats_lib.norm_scales, out_shardings=replicated)
    self._loss_and_stats = jax.jit(loss_and_stats, in_shardings=(self.param_shardings, self.batch_sharding),
                                   out_shardings=replicated)
    # Several processes each hold only part of a batch-sharded result; the scorer reads the whole one.
    logprobs_out = self.batch_sharding if jax.process_count() == 1 else replicated
    self._logprobs = jax.jit(logprobs, in_shardings=(self.param_shardings,) + (self.batch_sharding,) * 3,
                             out_shardings=logprobs_out)

  def steps(self, reload=False):
    if reload:
      self.manager.reload()
    return list(self.manager.all_steps())

  def check_checkpoint(self, step):
    """Raises CheckpointError if `step` is unreadable or its parameters are not the ones the config builds."""
    checkpoint_lib.verify(self.manager.directory, step)  # DamagedCheckpointError: never evaluated into NaN
    check_params_match(stored_param_metadata(self.workdir, step), self.abstract_params, step)

  def restore(self, step):
    self.check_checkpoint(step)
    with jax.set_mesh(self.mesh):
      return restore_params(self.manager, step, self.abstract_params, self.param_shardings)

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
          packed=self.config.eval.get('packed_scoring', True))
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


# ---- the output -------------------------------------------------------------------------------------------------

def write_result(workdir, result, lm_eval=None):
  """WORKDIR/eval/step_N.json (written whole, then renamed into place) and TensorBoard scalars. Process 0 only.

  `lm_eval=(config, task split sizes)` also writes the tasks' scores in lm-evaluation-harness's results format
  (perijax/tasks/lm_eval_results.py) when config.eval.lm_eval_results is on.
  """
  if jax.process_index() != 0:
    return
  path = rundir.eval_result(workdir, result['step'])
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / (path.name + '.tmp')
  temporary.write_text(json.dumps(result, indent=2) + '\n')
  temporary.replace(path)
  if lm_eval and result['tasks'] and lm_eval[0].eval.get('lm_eval_results', True):
    lm_eval_results.write(workdir, result, *lm_eval)
  step = result['step']
  with SummaryWriter(str(rundir.eval_tensorboard(workdir))) as writer:
    for key in ('loss', 'perplexity', 'bits_per_byte'):
      writer.add_scalar(f'eval/{key}', result[key], step)
    for name, value in scalars({**result['layers'], **result.get('norm_scales', {})}).items():
      writer.add_scalar(f'eval/{name}', value, step)
    for name, scores in result['tasks'].items():
      for metric in ('acc', 'acc_norm'):
        writer.add_scalar(f'tasks/{name}/{metric}', scores[metric], step)
