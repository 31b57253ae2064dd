"""LayerNorm and RMSNorm with a learnable scale γ (docs/paper.md: freezing the output γ reportedly hurts)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_KINDS = ('layernorm', 'rmsnorm')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_normalize(x, scale, eps):
  """x / RMS(x) * scale over the last axis. Its gradient is written out: XLA:CPU runs autodiff's version of it as
  several more passes over the activations."""
  return _rms_normalize_forward(x, scale, eps)[0]


def _rms_normalize_forward(x, scale, eps):
  inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * inverse_rms * scale, (x, inverse_rms, scale)


def _rms_normalize_backward(eps, residuals, grad):
  del eps
  x, inverse_rms, scale = residuals
  normalized, grad_normalized = x * inverse_rms, grad * scale
  projection = normalized * jnp.mean(grad_normalized * normalized, axis=-1, keepdims=True)
  return inverse_rms * (grad_normalized - projection), jnp.sum((grad * normalized).reshape(-1, x.shape[-1]), axis=0)


rms_normalize.defvjp(_rms_normalize_forward, _rms_normalize_backward)


class Norm(nn.Module):
  """Normalizes over the last axis; γ starts at `scale_init` (1: Llama/OLMo).

  `frozen_scale`: γ gets no gradient, so the optimizer never moves it (AdamW's update of a zero gradient is zero, and
  weight decay is masked off norms).
  """
  kind: str = 'rmsnorm'
  eps: float = 1e-6
  stats_dtype: jnp.dtype = jnp.float32  # dtype of the mean/variance computation (precision policy)
  dtype: jnp.dtype = jnp.float32        # dtype of the output
  param_dtype: jnp.dtype = jnp.float32
  axis_name: str = 'norm'               # logical axis of the scale/bias vector
  scale_init: float = 1.0
  frozen_scale: bool = False

  @nn.compact
  def __call__(self, x):
    def vector(name, init):
      value = self.param(name, nn.with_logical_partitioning(init, (self.axis_name,)), x.shape[-1:], self.param_dtype)
      return value.astype(self.stats_dtype)
    h = x.astype(self.stats_dtype)
    scale = vector('scale', nn.initializers.constant(self.scale_init))
    if self.frozen_scale:
      scale = jax.lax.stop_gradient(scale)
    if self.kind == 'rmsnorm':
      return rms_normalize(h, scale, self.eps).astype(self.dtype)
    h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps) * scale
    return (h + vector('bias', nn.initializers.zeros)).astype(self.dtype)
