"""Per-layer statistics of the residual stream and of each sub-layer's raw output F(.).

Cheap reductions computed inside the jitted step only when asked for. They are the raw material of the per-layer
variance summaries (docs/paper.md, claims 1 and 2).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from perijax import placement as placement_lib

FP16_MAX = 65504.0  # largest finite float16

# Per-tensor statistics, in the order the model stacks them.
TENSOR_STATS = ('var', 'rms', 'max_abs', 'fp16_overflow')


def tensor_stats(x):
  """Variance over the hidden dim (averaged over tokens), RMS, max |x| and the count of float16 overflows."""
  x = x.astype(jnp.float32)
  magnitude = jnp.abs(x)
  return {
      'var': jnp.mean(jnp.var(x, axis=-1)),
      'rms': jnp.sqrt(jnp.mean(jnp.square(x))),
      'max_abs': jnp.max(magnitude),
      # A value past 65504 (or already inf/nan) cannot be stored in float16.
      'fp16_overflow': jnp.sum((magnitude > FP16_MAX) | ~jnp.isfinite(x)).astype(jnp.int32),
  }


def sublayer_stats(residual, raw_output):
  """Statistics after one sub-layer: `residual_*` for the stream, `output_*` for F's raw output."""
  stats = {f'residual_{k}': v for k, v in tensor_stats(residual).items()}
  stats.update({f'output_{k}': v for k, v in tensor_stats(raw_output).items()})
  return stats


def layer_summary(stats):
  """Turns the model's stats ({name: [num_layers, 2 sub-layers (attention, mlp)]}) into per-layer lists.

  These are the names metrics.jsonl and eval/step_N.json use:
    residual_var, residual_rms: of the residual stream after the layer (after its MLP sub-layer);
    max_abs: the largest |x| of the layer's residual states and raw sub-layer outputs;
    fp16_headroom: max_abs / 65504 (> 1 means the value would not fit in float16);
    fp16_overflow: elements of those tensors past float16's range or non-finite;
    attn_out_var, mlp_out_var: variance of the raw attention / MLP output before any output norm;
    attn_logit_max: the largest |q·k/√head_dim| of the layer's attention (`max_attention_logit`).
  """
  s = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
  max_abs = np.maximum(s['residual_max_abs'], s['output_max_abs']).max(axis=1)
  return {
      'residual_var': s['residual_var'][:, 1].tolist(),
      'residual_rms': s['residual_rms'][:, 1].tolist(),
      'max_abs': max_abs.tolist(),
      'fp16_headroom': (max_abs / FP16_MAX).tolist(),
      'fp16_overflow': (s['residual_fp16_overflow'] + s['output_fp16_overflow']).sum(axis=1).astype(int).tolist(),
      'attn_out_var': s['output_var'][:, 0].tolist(),
      'mlp_out_var': s['output_var'][:, 1].tolist(),
      **({'attn_logit_max': s['attention_logit_max_abs'].tolist()} if 'attention_logit_max_abs' in s else {}),
  }


# ---- attention logits (Wortsman et al. 2023, arXiv:2309.14322: attention-logit growth precedes instability) -------

def max_attention_logit(q, k, segment_ids, block=256):
  """The largest |q·k / √head_dim| over the (query, key) pairs attention uses: causal, within one packed document,
  padding (segment 0) left out. q [batch, length, heads, head_dim], k [batch, length, kv_heads, head_dim] as they
  enter the softmax (after RoPE and any QK-norm). In float32, `block` queries at a time: only [batch, heads, block,
  length] logits exist at once. Statistics steps only; no gradient flows through it."""
  q, k = jax.lax.stop_gradient(q).astype(jnp.float32), jax.lax.stop_gradient(k).astype(jnp.float32)
  batch, length, heads, dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, length, kv_heads, heads // kv_heads, dim) / math.sqrt(dim)  # query head i uses kv head i // g
  size = math.gcd(length, block)

  def block_max(start):
    logits = jnp.einsum('btkgh,bskh->bkgts', jax.lax.dynamic_slice_in_dim(q, start, size, axis=1), k)
    allowed = ((start + jnp.arange(size))[:, None] >= jnp.arange(length)[None, :])[None]  # [1, block, length]
    if segment_ids is not None:
      query_segment = jax.lax.dynamic_slice_in_dim(segment_ids, start, size, axis=1)[:, :, None]
      allowed = allowed & (query_segment == segment_ids[:, None, :]) & (query_segment > 0)
    return jnp.max(jnp.where(allowed[:, None, None], jnp.abs(logits), 0.0))

  return jnp.max(jax.lax.map(block_max, jnp.arange(0, length, size)))


# ---- norm scales γ --------------------------------------------------------------------------------------------------

def norm_scales(params):
  """The parameter tree with every leaf but the norms' scales γ set to None: what `scale_summary` reads, small enough
  to gather on the host (jit it with a replicated output sharding when the parameters are sharded)."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf if path[-1].key == 'scale' else None, params)


def scale_summary(params, model_config):
  """Mean, min and max of the norms' γ, per layer for each kind of norm and whole for the others:
    in_norm_scale_{mean,min,max}, out_norm_scale_*: lists by layer over the layer's sub-layer input / output norms
      (placement.norm_role: Post-LN's norm is an output norm, Pre-LN's an input norm); None for a layer without one
      (Mix-LN), the key absent when no layer has one;
    qk_norm_scale_*: lists by layer over the query and key norms (model.norm.qk_norm);
    final_norm_scale_*, embed_norm_scale_*: numbers, when the model has that norm.
  `params` as the model's, scanned or looped, or `norm_scales(params)`."""
  placements = placement_lib.layer_placements(model_config.norm, model_config.num_layers)
  # The first layer of each run of equal placements: where scanned stack `layers_<g>` starts.
  stack_starts = [i for i, placement in enumerate(placements) if i == 0 or placement != placements[i - 1]]
  per_layer, summary = {}, {}  # per_layer: (kind, layer) -> [γ arrays]
  reductions = (('mean', np.mean), ('min', np.min), ('max', np.max))
  for key, tree in params.items():
    if key in ('final_norm', 'embed_norm'):
      scale = np.asarray(tree['scale'], np.float64)
      summary.update({f'{key}_scale_{name}': float(reduce(scale)) for name, reduce in reductions})
    elif key.startswith(('layer_', 'layers_')):
      index = int(key.split('_')[1])
      first, stacked = (stack_starts[index], True) if key.startswith('layers_') else (index, False)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [p.key for p in path]
        if names[-1] != 'scale':
          continue
        for layer, row in enumerate(np.asarray(leaf, np.float64).reshape(-1 if stacked else 1, leaf.shape[-1]),
                                    first):
          if names[-2] in ('query_norm', 'key_norm'):
            kind = 'qk_norm'
          else:  # 'attention_in_norm', 'mlp_norm', ...: the sub-layer's name, then the name placement gave N
            kind = placement_lib.norm_role(placements[layer], names[-2].split('_', 1)[1]) + '_norm'
          per_layer.setdefault((kind, layer), []).append(row)
  for kind in ('in_norm', 'out_norm', 'qk_norm'):
    if any(k == kind for k, _ in per_layer):
      for name, reduce in reductions:
        summary[f'{kind}_scale_{name}'] = [
            float(reduce(np.concatenate(per_layer[kind, layer]))) if (kind, layer) in per_layer else None
            for layer in range(model_config.num_layers)]
  return summary
