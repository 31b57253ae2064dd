"""The train state and the one pure training step: loss, gradient accumulation, dynamic loss scaling, skip-on-overflow,
AdamW, metrics.

`train_step(state, batch, ...) -> (state, metrics)` is jitted by `jit_train_step` (the trainer, the dry run and the
benchmarks all use it): explicit shardings and the old state donated. Nothing in here touches the host.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training.dynamic_scale import DynamicScale

from perijax import model as model_lib
from perijax import optimizer as optimizer_lib
from perijax import sharding as sharding_lib
from perijax.precision import Precision


@flax.struct.dataclass
class TrainState:
  step: jax.Array                # optimizer steps (train_step calls) so far
  params: Any
  opt_state: Any
  loss_scale: DynamicScale | None  # float16 only: flax's dynamic loss scale, checkpointed with the rest
  grad_norm_history: jax.Array   # last `spike_window` global gradient norms (NaN = not yet seen), for spike detection
  # The run's counters (COUNTERS), each also in every step's metrics:
  skipped_steps: jax.Array       # steps whose gradients were not finite once the loss scale had settled (skipped)
  initial_scale_backoffs: jax.Array  # float16: non-finite steps before the first finite one (the scale searching down
                                     # from train.initial_loss_scale), counted apart from skipped_steps
  forward_overflows: jax.Array   # steps whose loss itself was not finite (the forward pass overflowed)
  spikes: jax.Array              # gradient-norm spikes (see `is_spike`)


COUNTERS = ('skipped_steps', 'initial_scale_backoffs', 'forward_overflows', 'spikes')


def unboxed(tree):
  """Strips the logical-axis boxes (their shardings are already known) without adding sharding constraints."""
  def is_box(x):
    return isinstance(x, nn.Partitioned)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def make_model(config):
  # A run whose config.json predates train.massive_k gets the default.
  return model_lib.Transformer(ml_collections.FrozenConfigDict(config.model),
                               massive_k=config.train.get('massive_k', model_lib.Transformer.massive_k))


def uses_loss_scaling(config):
  return config.model.compute_dtype == 'float16' and config.train.loss_scale == 'dynamic'


def init_train_state(rng, config, model, optimizer):
  """A fresh state whose parameters are still boxed with logical axis names (unbox after sharding)."""
  params = model.init(rng, jnp.zeros((1, config.train.seq_len), jnp.int32))['params']
  loss_scale = None
  if uses_loss_scaling(config):
    # fin_steps strongly typed (flax defaults to a weak 0), as Orbax restores it: a resume compiles as a fresh run
    loss_scale = DynamicScale(growth_interval=config.train.loss_scale_growth_interval,
                              fin_steps=jnp.zeros((), jnp.int32),
                              scale=jnp.asarray(config.train.initial_loss_scale, jnp.float32))
  history = jnp.full((config.train.spike_window,), jnp.nan, jnp.float32)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    loss_scale=loss_scale, grad_norm_history=history,
                    **{counter: jnp.zeros((), jnp.int32) for counter in COUNTERS})


def abstract_train_state(config, model, optimizer, mesh):
  """(abstract unboxed state, its NamedShardings) without allocating anything: shape-first sharded init."""
  init = functools.partial(init_train_state, config=config, model=model, optimizer=optimizer)
  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding_lib.shardings_of(boxed, mesh, sharding_lib.logical_rules(config.mesh))
  sharding_lib.check_divisible(unboxed(boxed), shardings, mesh)
  return unboxed(boxed), shardings


def create_train_state(config, model, optimizer, mesh):
  """(the initial state, its NamedShardings), each array created directly in its shard (never whole on one device)."""
  _, shardings = abstract_train_state(config, model, optimizer, mesh)
  init = functools.partial(init_train_state, config=config, model=model, optimizer=optimizer)
  return unboxed(jax.jit(init, out_shardings=shardings)(jax.random.key(config.train.seed))), shardings


def cross_entropy(logits, targets, weights, dtype):
  """Mean negative log-likelihood over the target tokens with weight 1 (padding has weight 0)."""
  log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll.astype(jnp.float32) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def compute_loss(params, batch, model, collect_stats=False):
  """(loss, per-layer statistics or None) for one batch."""
  logits, stats = model.apply({'params': params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                              collect_stats=collect_stats)
  return cross_entropy(logits, batch['targets'], batch['weights'], Precision.from_config(model.config).loss), stats


def is_spike(grad_norm, history, spike_factor):
  """The documented spike rule: a finite global gradient norm above spike_factor x the median of the previous
  spike_window finite norms, once the window is full. k = config.train.spike_factor, W = config.train.spike_window."""
  window_full = jnp.all(jnp.isfinite(history))
  return window_full & jnp.isfinite(grad_norm) & (grad_norm > spike_factor * jnp.nanmedian(history))


def batch_gradients(params, batch, model, loss_scale, collect_stats):
  """(loss scale after, grads finite or None, loss, stats, unscaled grads) of one batch; flax's DynamicScale scales
  the loss, unscales the gradients and moves the scale."""
  objective = functools.partial(compute_loss, batch=batch, model=model, collect_stats=collect_stats)
  if loss_scale is None:
    (loss, stats), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return None, None, loss, stats, grads
  loss_scale, grads_finite, (loss, stats), grads = loss_scale.value_and_grad(objective, has_aux=True)(params)
  return loss_scale, grads_finite, loss, stats, grads


def accumulated_gradients(params, batch, model, loss_scale, collect_stats):
  """`batch_gradients` of the mean loss over a batch's leading micro-batch axis ([k, B, T]: k micro-batches of one
  update), one micro-batch at a time (activations of one in memory). Every micro-batch uses the step's loss scale;
  the scale moves once, as DynamicScale moves it for the whole step: backs off if any gradient is not finite. The
  statistics are the last micro-batch's."""
  def micro_step(grad_sum, micro_batch):
    scale_after, finite, loss, stats, grads = batch_gradients(params, micro_batch, model, loss_scale, collect_stats)
    grad_sum = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grad_sum, grads)
    return grad_sum, (scale_after, finite, loss, stats)

  # Summed, and passed on, in float32: k float16 gradients could overflow where their mean does not, and a float16
  # cast of the mean would undo the loss scale's protection of small gradients (flax unscales them into float32).
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  grad_sum, (scales_after, finite, losses, stats) = jax.lax.scan(micro_step, zeros, batch)
  grads = jax.tree.map(lambda total: total / losses.shape[0], grad_sum)
  last = functools.partial(jax.tree.map, lambda x: x[-1])
  if loss_scale is None:
    return None, None, jnp.mean(losses), last(stats), grads
  # The scale DynamicScale leaves after a finite micro-batch is its all-finite update; after a non-finite one, its
  # back-off. The first non-finite micro-batch's (argmin of `finite`), or the first's when all were finite.
  first_non_finite = jnp.argmin(finite)
  return (jax.tree.map(lambda x: x[first_non_finite], scales_after), jnp.all(finite), jnp.mean(losses),
          last(stats), grads)


def train_step(state, batch, *, model, optimizer, train_config, collect_stats=False):
  """One optimizer update on `batch` ([B, T] arrays, or [k, B, T]: k micro-batches accumulated). Non-finite
  gradients leave params and optimizer state as they were, shrink the loss scale and count a skipped step."""
  gradients = accumulated_gradients if batch['inputs'].ndim == 3 else batch_gradients
  loss_scale, grads_finite, loss, stats, grads = gradients(state.params, batch, model, state.loss_scale,
                                                           collect_stats)
  grad_norm, layer_grad_norm = model_lib.grad_norms(grads)
  if loss_scale is None:
    grads_finite = jnp.isfinite(grad_norm)  # a NaN or inf anywhere makes the norm non-finite

  def update(_):
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    # The state keeps its dtypes (float16 moments in pure float16; Adam's arithmetic upcasts them on the way).
    new_opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt_state, state.opt_state)
    return optax.apply_updates(state.params, updates), new_opt_state

  # A branch rather than a jnp.where over every leaf: the update stays in place (5% of the CPU step, measured).
  params, opt_state = jax.lax.cond(grads_finite, update, lambda _: (state.params, state.opt_state), None)
  spike = grads_finite & is_spike(grad_norm, state.grad_norm_history, train_config.spike_factor)
  history = jnp.roll(state.grad_norm_history, -1).at[-1].set(grad_norm)
  forward_overflow = ~jnp.isfinite(loss)
  # Until the first finite step the loss scale is still searching down from its initial value (every update so far
  # was skipped): non-finite gradients of a finite loss then are a back-off, not an instability. float32 has no
  # search, and a non-finite loss (the forward pass overflowed) is never the scale's doing.
  searching = ((state.step == state.skipped_steps + state.initial_scale_backoffs) & (loss_scale is not None)
               & ~forward_overflow)
  non_finite = (~grads_finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, loss_scale=loss_scale,
      grad_norm_history=jnp.where(grads_finite, history, state.grad_norm_history),
      skipped_steps=state.skipped_steps + jnp.where(searching, 0, non_finite),
      initial_scale_backoffs=state.initial_scale_backoffs + jnp.where(searching, non_finite, 0),
      forward_overflows=state.forward_overflows + forward_overflow.astype(jnp.int32),
      spikes=state.spikes + spike.astype(jnp.int32))
  metrics = dict(
      loss=loss, grad_norm=grad_norm, layer_grad_norm=layer_grad_norm, grads_finite=grads_finite,
      forward_overflow=forward_overflow, spike=spike,
      schedule_count=optimizer_lib.schedule_count(state.opt_state),  # this update's lr is schedule(count)
      loss_scale=loss_scale.scale if loss_scale is not None else jnp.ones((), jnp.float32),
      **{counter: getattr(new_state, counter) for counter in COUNTERS}, **({'stats': stats} if collect_stats else {}))
  return new_state, metrics


def jit_train_step(config, model, optimizer, state_shardings, batch_sharding, collect_stats=False):
  """`train_step` jitted as the trainer runs it: state and batch laid out by their shardings, metrics replicated,
  the old state donated (its buffers are reused for the new one)."""
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  step = functools.partial(train_step, model=model, optimizer=optimizer, train_config=config.train,
                           collect_stats=collect_stats)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
                 donate_argnums=0)
