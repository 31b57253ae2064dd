"""LayerNorm and RMSNorm with a learnable scale γ (docs/paper.md: freezing the output γ reportedly hurts)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_KINDS = ('layernorm', 'rmsnorm')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_normalize(x, scale, eps):
  """x / RMS(x) * scale over the last axis."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale


def _rms_normalize_forward(x, scale, eps):
  inverse_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * inverse_rms * scale, (x, inverse_rms, scale)


def _rms_normalize_backward(eps, residuals, grad):
  # Written out: XLA:CPU runs autodiff's version of this as several more passes over the activations.
  del eps
  x, inverse_rms, scale = residuals
  normalized = x * inverse_rms
  grad_normalized = grad * scale
  grad_x = inverse_rms * (grad_normalized - normalized * jnp.mean(grad_normalized * normalized, axis=-1,
                                                                   keepdims=True))
  grad_scale = jnp.sum((grad * normalized).reshape(-1, x.shape[-1]), axis=0)
  return grad_x, grad_scale


rms_normalize.defvjp(_rms_normalize_forward, _rms_normalize_backward)


class Norm(nn.Module):
  """Normalizes over the last axis. The scale γ is stored as a weight initialised to `scale_init` (1: Llama/OLMo).

  `frozen_scale`: γ gets no gradient (stop_gradient), so the optimizer never moves it (AdamW's update of a zero
  gradient is zero, and weight decay is masked off norms).
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
    features = x.shape[-1]
    h = x.astype(self.stats_dtype)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.constant(self.scale_init),
                                                             (self.axis_name,)), (features,), self.param_dtype)
    if self.frozen_scale:
      scale = jax.lax.stop_gradient(scale)
    if self.kind == 'rmsnorm':
      return rms_normalize(h, scale.astype(self.stats_dtype), self.eps).astype(self.dtype)
    h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + self.eps) * scale.astype(self.stats_dtype)
    bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (features,), self.param_dtype)
    return (h + bias.astype(self.stats_dtype)).astype(self.dtype)
