"""AdamW with warmup + decay, global-norm clipping, weight decay off norms and biases. (Gradient accumulation is in the
train step: perijax/train_step.py.)"""

import jax
import optax


def learning_rate_schedule(optimizer_config, total_steps):
  c = optimizer_config
  decay_steps = max(total_steps - c.warmup_steps, 1)
  if c.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(c.lr, decay_steps, alpha=c.end_lr_factor)
  elif c.schedule == 'linear':
    decay = optax.linear_schedule(c.lr, c.lr * c.end_lr_factor, decay_steps)
  else:
    decay = optax.constant_schedule(c.lr)
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), decay], [c.warmup_steps])


def decay_mask(params):
  """Weight decay only on matrices: norm scales and biases (1-D per layer) are left alone."""
  def is_matrix(path, _):
    return not any(getattr(key, 'key', '') in ('scale', 'bias') for key in path)
  return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(optimizer_config, total_steps):
  c = optimizer_config
  clip = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
  return optax.chain(*clip, optax.adamw(learning_rate_schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps,
                                         weight_decay=c.weight_decay, mask=decay_mask))


def schedule_count(opt_state):
  """Updates the learning-rate schedule has applied: optax's own count, which a skipped step (the update not applied,
  the optimizer state kept) does not advance. The lr of the next update is `learning_rate_schedule(...)(count)`."""
  def is_schedule(x):
    return isinstance(x, optax.ScaleByScheduleState)
  (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(s)]
  return state.count
