"""A decoder-only Transformer LM in flax.linen, with the norm placement chosen by `config.model.norm.placement`.

Every parameter and the main activations carry logical axis names; `config.mesh.logical_axis_rules` maps them onto
the device mesh. The placement itself lives in `placement.residual_sublayer`; this file never branches on it.
"""

import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perijax import placement as placement_lib
from perijax import stats as stats_lib
from perijax.norms import Norm
from perijax.precision import Precision

REMAT_POLICIES = {
    'none': None,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs, recompute the rest
    'full': jax.checkpoint_policies.nothing_saveable,                     # recompute everything in the backward pass
}


def head_dim(model_config):
  return model_config.head_dim or model_config.d_model // model_config.num_heads


def mlp_dim(model_config):
  if model_config.mlp_dim:
    return model_config.mlp_dim
  if model_config.mlp_activation == 'swiglu':  # 8/3 d keeps the parameter count of a 4d GELU MLP (Llama)
    return -(-8 * model_config.d_model // 3 // 64) * 64
  return 4 * model_config.d_model


def dense_init(std, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def dense(precision, width, std, axes, name):
  return nn.Dense(width, use_bias=False, dtype=precision.compute, param_dtype=precision.param,
                  kernel_init=dense_init(std, axes), name=name)


def output_init_std(model_config):
  """Init std of the sub-layers' output projections: Megatron-LM's std / sqrt(2 * layers) when
  `model.init.depth_scaled_outputs`, so that the residual sum of 2 * layers terms keeps its scale at init."""
  init = model_config.init
  return init.std / math.sqrt(2 * model_config.num_layers) if init.depth_scaled_outputs else init.std


def make_norm(model_config, precision, name, kind=None, **options):
  """A norm as `model.norm` says (of `kind` if given), its statistics in the precision policy's dtype."""
  p = precision
  return Norm(kind or model_config.norm.kind, model_config.norm.eps, p.norm, p.compute, p.param,
              scale_init=model_config.norm.scale_init, name=name, **options)


def flatten_tokens(x):
  """[batch, length, ...] -> [batch * length, ...]. Matmuls over one token axis: XLA:CPU differentiates a 2-D matmul
  several times faster than one contracting batch and length together (the weight gradient); free elsewhere."""
  return x.reshape(-1, *x.shape[2:])


def rope(x, positions, theta):
  """Rotary position embedding on [batch, length, heads, head_dim], rotating the two halves of head_dim."""
  half = x.shape[-1] // 2
  angle = positions[:, :, None, None].astype(jnp.float32) * theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def einsum_attention(q, k, v, mask, dtype):
  """Causal attention written out, with logits and softmax in `dtype`: for `model.attention_impl='einsum'` (on CPU
  its gradient is faster) and for a softmax not in float32, which jax.nn.dot_product_attention cannot show."""
  groups = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum('btnh,bsnh->bnts', q.astype(dtype), k.astype(dtype)) / jnp.sqrt(q.shape[-1]).astype(dtype)
  allowed = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))[None, None]
  if mask is not None:
    allowed = allowed & mask
  weights = jax.nn.softmax(jnp.where(allowed, logits, jnp.finfo(dtype).min), axis=-1).astype(v.dtype)
  return jnp.einsum('bnts,bsnh->btnh', weights, v)


class Attention(nn.Module):
  """Returns (output, the largest |attention logit| if `collect_stats` else None)."""
  config: Any  # config.model
  precision: Precision
  collect_stats: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg, p = self.config, self.precision
    heads, kv_heads, dim, d = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, head_dim(cfg), cfg.d_model

    # nn.Einsum rather than DenseGeneral: its kernel is created in its final shape, so the logical axes apply at init.
    def project(name, a, shape, equation, axes, std=cfg.init.std):
      out = nn.Einsum(shape, equation, use_bias=False, dtype=p.compute, param_dtype=p.param,
                      kernel_init=dense_init(std, axes), name=name)(flatten_tokens(a))
      return out.reshape(*x.shape[:2], *out.shape[1:])

    q = project('query', x, (d, heads, dim), 'md,dnh->mnh', ('embed', 'heads', 'head_dim'))
    k, v = (project(name, x, (d, kv_heads, dim), 'md,dnh->mnh', ('embed', 'kv_heads', 'head_dim'))
            for name in ('key', 'value'))
    if cfg.norm.qk_norm:  # per head before RoPE, one [head_dim] scale for all heads (Qwen3/Gemma 3; OLMo 2: whole q/k)
      q, k = (make_norm(cfg, p, name, 'rmsnorm', axis_name='head_dim')(a) for name, a in (('query_norm', q),
                                                                                        ('key_norm', k)))
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    logit_max = stats_lib.max_attention_logit(q, k, segment_ids) if self.collect_stats else None
    # Tokens attend only within their own packed document; causality is added by the attention call.
    mask = None if segment_ids is None else segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if p.softmax == jnp.float32 and cfg.attention_impl != 'einsum':
      if q.dtype == jnp.float16 and jax.default_backend() == 'cpu':
        # XLA:CPU cannot compile the gradient of a float16 x float16 -> float32 dot; the logits are float32 anyway,
        # and the output is cast back to float16 below, so overflow behaves as on a GPU.
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
      implementation = None if cfg.attention_impl == 'auto' else cfg.attention_impl
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
      out = out.astype(p.compute)
    else:
      out = einsum_attention(q, k, v, mask, p.softmax)
    out = nn.with_logical_constraint(out, ('batch', 'length', 'heads', 'head_dim'))
    out = project('out', out, (heads, dim, d), 'mnh,nhd->md', ('heads', 'head_dim', 'embed'), output_init_std(cfg))
    return out, logit_max


class Mlp(nn.Module):
  config: Any
  precision: Precision

  @nn.compact
  def __call__(self, x):
    cfg, p = self.config, self.precision
    tokens = flatten_tokens(x)
    up = dense(p, mlp_dim(cfg), cfg.init.std, ('embed', 'mlp'), 'up')
    if cfg.mlp_activation == 'swiglu':
      h = nn.silu(dense(p, mlp_dim(cfg), cfg.init.std, ('embed', 'mlp'), 'gate')(tokens)) * up(tokens)
    else:
      h = nn.gelu(up(tokens))
    h = nn.with_logical_constraint(h, ('batch', 'mlp'))
    return dense(p, cfg.d_model, output_init_std(cfg), ('mlp', 'embed'), 'down')(h).reshape(x.shape)


class Layer(nn.Module):
  """One Transformer layer: attention then MLP, each a residual sub-layer under `placement`."""
  config: Any
  precision: Precision
  placement: str
  collect_stats: bool = False
  massive_k: int = stats_lib.MASSIVE_K

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg, p = self.config, self.precision
    attention, logit_max = Attention(cfg, p, self.collect_stats, name='attention'), []

    def attend(h):
      out, largest = attention(h, positions, segment_ids)
      logit_max.append(largest)
      return out

    sublayer_stats = []
    for sublayer_name, sublayer in (('attention', attend), ('mlp', Mlp(cfg, p, name='mlp'))):
      def norm(name, sublayer_name=sublayer_name):
        frozen = cfg.norm.freeze_out_scale and placement_lib.norm_role(self.placement, name) == 'out'
        return make_norm(cfg, p, f'{sublayer_name}_{name}', frozen_scale=frozen)
      residual_in = x
      x, out = placement_lib.residual_sublayer(self.placement, x, sublayer, norm)
      x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
      if self.collect_stats:  # traced only on statistics steps, over real tokens (padding has segment id 0)
        sublayer_stats.append(stats_lib.sublayer_stats(x, out, residual_in, stats_lib.token_mask(segment_ids, x.shape),
                                                       self.massive_k))
    if not self.collect_stats:
      return x, None
    # [2] per statistic: index 0 after attention, 1 after the MLP; the attention logit is the attention's alone.
    stats = jax.tree.map(lambda a, b: jnp.stack([a, b]), *sublayer_stats)
    return x, {**stats, 'attention_logit_max_abs': logit_max[0]}


class Transformer(nn.Module):
  """Decoder-only LM. `__call__` returns (logits, stats); stats is None unless `collect_stats`, else perijax/stats.py's
  per-layer statistics: [layers, 2 sub-layers] each, attention_logit_max_abs [layers], *_massive_* [layers, 2, k]."""
  config: Any  # config.model
  massive_k: int = stats_lib.MASSIVE_K  # largest |x| kept per tensor on statistics steps (config.train.massive_k)

  @nn.compact
  def __call__(self, inputs, positions=None, segment_ids=None, collect_stats=False):
    cfg = self.config
    p = Precision.from_config(cfg)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=p.compute, param_dtype=p.param,
                     embedding_init=dense_init(cfg.init.std, ('vocab', 'embed')), name='embed')
    x = embed(inputs)
    if cfg.norm.embed_norm:
      x = make_norm(cfg, p, 'embed_norm')(x)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    placements = placement_lib.layer_placements(cfg.norm, cfg.num_layers)
    layer = Layer if cfg.remat == 'none' else nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat],
                                                       prevent_cse=not cfg.scan_layers)
    layer_stats = []  # one entry per scanned stack or per looped layer, each [layers in it, ...]
    for group, (placement, count) in enumerate(runs_of_equal(placements)):
      layer_args = (cfg, p, placement, collect_stats, self.massive_k)
      if cfg.scan_layers:  # one compiled layer body, looped `count` times: compile time does not grow with depth
        stack = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast), length=count,
                        unroll=min(cfg.scan_unroll, count), metadata_params={nn.PARTITION_NAME: 'layers'})
        x, stats = stack(*layer_args, name=f'layers_{group}')(x, positions, segment_ids)
        layer_stats.append(stats)
      else:
        for _ in range(count):
          x, stats = layer(*layer_args, name=f'layer_{len(layer_stats)}')(x, positions, segment_ids)
          layer_stats.append(jax.tree.map(lambda a: a[None], stats))
    if placement_lib.needs_final_norm(placements[-1]):
      x = make_norm(cfg, p, 'final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = dense(p, cfg.vocab_size, cfg.init.std, ('embed', 'vocab'), 'lm_head')(x)
    logits = nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))
    if not collect_stats:
      return logits, None
    return logits, stats_lib.locate_tokens(jax.tree.map(lambda *a: jnp.concatenate(a), *layer_stats), inputs, positions)


def runs_of_equal(items):
  """[a, a, b] -> [(a, 2), (b, 1)]: layers of one placement are scanned together."""
  return [(item, len(list(run))) for item, run in itertools.groupby(items)]


def grad_norms(grads):
  """(global L2 norm, L2 norm of each layer in layer order) of a gradient tree, in one pass over it (the global norm
  adds the layers' sums of squares to the rest's), for both the scanned and the looped parameter layout."""
  def squares(leaf, first_axis=0):
    return jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=tuple(range(first_axis, leaf.ndim)))

  layer_keys = sorted((k for k in grads if k.startswith('layer')), key=lambda k: int(k.split('_')[1]))
  # A scanned stack `layers_<g>` has its layers on the leading axis; a looped `layer_<i>` is one layer.
  layer_squares = jnp.concatenate([
      jnp.atleast_1d(sum(squares(leaf, int(key.startswith('layers_'))) for leaf in jax.tree.leaves(grads[key])))
      for key in layer_keys])
  others = [squares(leaf) for key in grads if key not in layer_keys for leaf in jax.tree.leaves(grads[key])]
  return jnp.sqrt(jnp.sum(layer_squares) + sum(others, jnp.zeros((), jnp.float32))), jnp.sqrt(layer_squares)
