"""LayerNorm and RMSNorm with a learnable scale (PAPER.md: freezing the output norm's gamma hurts)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_KINDS = ('layernorm', 'rmsnorm')


class Norm(nn.Module):
  """Normalizes over the last axis. The scale is stored as a weight initialised to 1 (Llama/OLMo convention)."""
  kind: str = 'rmsnorm'
  eps: float = 1e-6
  stats_dtype: jnp.dtype = jnp.float32  # dtype of the mean/variance computation (precision policy)
  dtype: jnp.dtype = jnp.float32        # dtype of the output
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = 'norm'               # logical axis of the scale/bias vector

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    h = x.astype(self.stats_dtype)
    if self.kind == 'layernorm':
      h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (features,), self.param_dtype)
    h = h * scale.astype(self.stats_dtype)
    if self.kind == 'layernorm':
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                        (features,), self.param_dtype)
      h = h + bias.astype(self.stats_dtype)
    return h.astype(self.dtype)

