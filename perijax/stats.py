"""Per-layer statistics of the residual stream and of each sub-layer's raw output F(.): cheap reductions inside the
jitted step, only on statistics steps, over real tokens only (padding, segment id 0, is masked out). What each one
means: README.md, "Metrics" and "Per-layer statistics".
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from perijax import placement as placement_lib

FP16_MAX = 65504.0  # largest finite float16
MEDIAN_BISECTION_STEPS = 20  # halvings of a 64-octave bracket: median |x| to a relative 2^(64/2^20) - 1 = 4e-5
MASSIVE_K = 8                  # top-k |x| kept per tensor (config.train.massive_k)
MASSIVE_ABS_THRESHOLD = 100.0    # Sun et al. 2024's criterion: |x| > 100 ...
MASSIVE_RATIO_THRESHOLD = 1000.0  # ... and > 1000 x the median |x| (runs whose config predates the fields use these)
# (summary name, model stats prefix, sub-layer index): the stream after the layer, each sub-layer's raw output.
MASSIVE_TENSORS = (('residual', 'residual', 1), ('attn_out', 'output', 0), ('mlp_out', 'output', 1))


def token_mask(segment_ids, shape):
  """1 for a real token, 0 for padding (segment id 0); without segment ids every token is real."""
  if segment_ids is None:
    return jnp.ones(shape[:-1], jnp.float32)
  return (segment_ids != 0).astype(jnp.float32)


def _token_mean(per_token, mask):
  """Mean over real tokens (a NaN in padding stays out of it)."""
  return jnp.sum(jnp.where(mask > 0, per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def tensor_stats(x, mask=None):
  """Variance over the hidden dim (averaged over tokens), RMS, max |x| and the count of float16 overflows."""
  x = x.astype(jnp.float32)
  mask = token_mask(None, x.shape) if mask is None else mask
  real, magnitude = mask[..., None] > 0, jnp.abs(x)
  return {'var': _token_mean(jnp.var(x, axis=-1), mask),
          'rms': jnp.sqrt(_token_mean(jnp.mean(jnp.square(x), axis=-1), mask)),
          'max_abs': jnp.max(jnp.where(real, magnitude, 0.0)),
          # A value past 65504 (or already inf/nan) cannot be stored in float16.
          'fp16_overflow': jnp.sum(real & ((magnitude > FP16_MAX) | ~jnp.isfinite(x))).astype(jnp.int32)}


def increment_stats(before, after, mask):
  """Var(x + Δ) - Var(x) = Var(Δ) + 2·Cov(x, Δ) per token over the hidden dim, averaged over real tokens, x the
  stream entering the sub-layer and Δ = after - before its net change (docs/paper.md, section 2)."""
  before, after = before.astype(jnp.float32), after.astype(jnp.float32)
  delta = after - before
  centered_before = before - jnp.mean(before, axis=-1, keepdims=True)
  centered_delta = delta - jnp.mean(delta, axis=-1, keepdims=True)
  return {'increment_var': _token_mean(jnp.var(after, axis=-1) - jnp.var(before, axis=-1), mask),
          'delta_var': _token_mean(jnp.var(delta, axis=-1), mask),
          'cross_cov': _token_mean(jnp.mean(centered_before * centered_delta, axis=-1), mask)}


def median_abs(magnitude, real, steps=MEDIAN_BISECTION_STEPS):
  """The lower median of `magnitude` (>= 0) over the entries where `real`, approximately: bisection on log2 over the
  64 octaves below the maximum. Each step is one masked count (no sort, and it stays sharded); the result is within a
  relative 2^(64 / 2^steps) - 1 of the exact lower median, and 0 when half the entries are below 2^-64 x the max."""
  real = jnp.broadcast_to(real, magnitude.shape)
  half = jnp.sum(real, dtype=jnp.float32) / 2
  top = jnp.log2(jnp.maximum(jnp.max(jnp.where(real, magnitude, 0.0)), jnp.finfo(jnp.float32).tiny))

  def count_at_most(log_value):
    return jnp.sum(real & (magnitude <= jnp.exp2(log_value)), dtype=jnp.float32)

  def halve(_, bracket):  # invariant: count(<= 2^low) < half <= count(<= 2^high)
    low, high = bracket
    middle = (low + high) / 2
    enough = count_at_most(middle) >= half
    return jnp.where(enough, low, middle), jnp.where(enough, middle, high)

  _, high = jax.lax.fori_loop(0, steps, halve, (top - 64.0, top))
  return jnp.where(count_at_most(top - 64.0) >= half, 0.0, jnp.exp2(high))


def massive_stats(x, mask, k):
  """Massive activations (Sun et al. 2024, arXiv:2402.17762): the k largest |x| over real tokens and channels, where
  they sit (flat token index batch x length + t, and channel), and the median |x| they are compared with."""
  width = x.shape[-1]
  magnitude = jnp.abs(x.astype(jnp.float32)).reshape(-1, width)
  real = mask.reshape(-1, 1) > 0
  # Exact top-k in two stages: each of the k largest entries is among its own token's k largest. The first stage is
  # local to the device holding the token; the second ranks only tokens x k candidates, not the whole tensor.
  per_token, per_token_channel = jax.lax.top_k(jnp.where(real, magnitude, -1.0), min(k, width))
  values, flat = jax.lax.top_k(per_token.reshape(-1), min(k, per_token.size))
  return {'massive_abs': values, 'massive_token_index': flat // per_token.shape[1],
          'massive_channel': per_token_channel.reshape(-1)[flat], 'median_abs': median_abs(magnitude, real)}


def sublayer_stats(residual, raw_output, residual_in, mask, massive_k):
  """After one sub-layer: `residual_*` for the stream, `output_*` for F's raw output (each with its massive_k largest
  |x|), and the increment decomposition against `residual_in`, the stream entering the sub-layer."""
  stats = increment_stats(residual_in, residual, mask)
  for prefix, tensor in (('residual', residual), ('output', raw_output)):
    both = {**tensor_stats(tensor, mask), **massive_stats(tensor, mask, massive_k)}
    stats.update({f'{prefix}_{k}': v for k, v in both.items()})
  return stats


def locate_tokens(stats, inputs, positions):
  """Replaces each massive activation's flat token index by its token id and its position in its document."""
  stats = dict(stats)
  for prefix in ('residual', 'output'):
    index = stats.pop(f'{prefix}_massive_token_index', None)
    if index is not None:
      stats[f'{prefix}_massive_token'] = inputs.reshape(-1)[index]
      stats[f'{prefix}_massive_position'] = positions.reshape(-1)[index]
  return stats


def overflow_max(values):
  """The largest of `values` (None when empty), a NaN counted as +inf: in these statistics NaN comes from an overflow
  (inf - inf), no headroom or an unbounded logit. Python's max() keeps a NaN only when it comes first."""
  values = [math.inf if math.isnan(v) else v for v in values]
  return max(values) if values else None


def layer_summary(stats):
  """The model's stats ({name: [num_layers, 2 sub-layers (attention, mlp)]}) as the per-layer lists of metrics.jsonl
  and eval/step_N.json: the stream's after the layer's MLP sub-layer, max_abs and fp16_overflow over the layer's
  residual states and raw sub-layer outputs, the others per sub-layer (`attn_*`, `mlp_*`)."""
  s = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
  max_abs = np.maximum(s['residual_max_abs'], s['output_max_abs']).max(axis=1)
  summary = {
      'residual_var': s['residual_var'][:, 1].tolist(), 'residual_rms': s['residual_rms'][:, 1].tolist(),
      'max_abs': max_abs.tolist(), 'fp16_headroom': (max_abs / FP16_MAX).tolist(),
      'fp16_overflow': (s['residual_fp16_overflow'] + s['output_fp16_overflow']).sum(axis=1).astype(int).tolist(),
      'attn_out_var': s['output_var'][:, 0].tolist(), 'mlp_out_var': s['output_var'][:, 1].tolist(),
      **({'attn_logit_max': s['attention_logit_max_abs'].tolist()} if 'attention_logit_max_abs' in s else {}),
  }
  for index, sublayer in enumerate(('attn', 'mlp')):
    summary.update({f'{sublayer}_{key}': s[key][:, index].tolist()
                    for key in ('increment_var', 'delta_var', 'cross_cov') if key in s})
  for name, prefix, index in MASSIVE_TENSORS:
    if f'{prefix}_massive_abs' in s:
      summary[f'massive_{name}'] = massive_entries(s, prefix, index)
  return summary


def massive_entries(s, prefix, index):
  """One {abs, median, ratio, token, position, channel} per layer from [layers, 2, k] arrays (see layer_summary)."""
  values, medians = s[f'{prefix}_massive_abs'][:, index], s[f'{prefix}_median_abs'][:, index]
  where = {field: s[f'{prefix}_massive_{field}'][:, index].astype(int) for field in ('token', 'position', 'channel')}
  with np.errstate(divide='ignore', invalid='ignore'):
    ratios = values / medians[:, None]
  return [{'abs': values[layer].tolist(), 'median': float(medians[layer]), 'ratio': ratios[layer].tolist(),
           **{field: where[field][layer].tolist() for field in where}} for layer in range(len(values))]


def massive_flags(entries, abs_threshold=MASSIVE_ABS_THRESHOLD, ratio_threshold=MASSIVE_RATIO_THRESHOLD):
  """Per layer, how many of its top-k |x| are massive: |x| > abs_threshold and > ratio_threshold x the median |x|."""
  return [sum(v > abs_threshold and r > ratio_threshold for v, r in zip(e['abs'], e['ratio'])) for e in entries]


def merge_massive(per_batch):
  """Several batches' massive activations as one: the k largest of all batches' top-k, with where they sit (their
  median |x| is averaged with the other statistics)."""
  merged = {}
  for prefix in ('residual', 'output'):
    if f'{prefix}_massive_abs' not in per_batch[0]:
      continue
    stacked = {field: np.concatenate([np.asarray(stats[f'{prefix}_massive_{field}']) for stats in per_batch], -1)
               for field in ('abs', 'token', 'position', 'channel')}
    k = np.shape(per_batch[0][f'{prefix}_massive_abs'])[-1]
    order = np.argsort(-stacked['abs'], axis=-1, kind='stable')[..., :k]
    merged.update({f'{prefix}_massive_{field}': np.take_along_axis(values, order, axis=-1)
                   for field, values in stacked.items()})
  return merged


def max_attention_logit(q, k, segment_ids, block=256):
  """The largest |q·k / √head_dim| over the (query, key) pairs attention uses (causal, within one packed document,
  no padding): attention-logit growth precedes instability (Wortsman et al. 2023, arXiv:2309.14322). q [batch,
  length, heads, head_dim], k [batch, length, kv_heads, head_dim] as they enter the softmax. In float32, `block`
  queries at a time, so only [batch, heads, block, length] logits exist at once; no gradient flows through it."""
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


def norm_scales(params):
  """The parameter tree with every leaf but the norms' scales γ set to None: what `scale_summary` reads, small enough
  to gather on the host (jit it with a replicated output sharding when the parameters are sharded)."""
  return jax.tree_util.tree_map_with_path(lambda path, leaf: leaf if path[-1].key == 'scale' else None, params)


def scale_summary(params, model_config):
  """Mean, min and max of the norms' γ (keys in README.md, "Metrics"): lists by layer for the input, output
  (placement.norm_role) and QK norms, None for a layer without one; numbers for the final and embedding norms.
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
        rows = np.asarray(leaf, np.float64).reshape(-1 if stacked else 1, leaf.shape[-1])
        for layer, row in enumerate(rows, first):
          if names[-2] in ('query_norm', 'key_norm'):
            kind = 'qk_norm'
          else:  # 'attention_in_norm', 'mlp_norm', ...: the sub-layer's name, then the name placement gave N
            kind = placement_lib.norm_role(placements[layer], names[-2].split('_', 1)[1]) + '_norm'
          per_layer.setdefault((kind, layer), []).append(row)
  for kind in sorted({kind for kind, _ in per_layer}):
    for name, reduce in reductions:
      summary[f'{kind}_scale_{name}'] = [
          float(reduce(np.concatenate(per_layer[kind, layer]))) if (kind, layer) in per_layer else None
          for layer in range(model_config.num_layers)]
  return summary
