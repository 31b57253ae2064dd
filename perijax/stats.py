"""Per-layer statistics of the residual stream and of each sub-layer's raw output F(.).

Cheap reductions computed inside the jitted step only when asked for. They are the raw material of the per-layer
variance summaries (docs/paper.md, claims 1 and 2).
"""

import jax.numpy as jnp
import numpy as np

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
    attn_out_var, mlp_out_var: variance of the raw attention / MLP output before any output norm.
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
  }
