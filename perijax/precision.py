"""The dtype policy: where each kind of number lives, read from `config.model`.

Parameters are stored in `param_dtype` (float32 master weights by default; float16 for a "pure float16" run, optimizer
state included), matmuls and activations run in `compute_dtype`, and the numerically delicate reductions run in float32
unless the config says otherwise, so an experiment can show what pure float16 does.
"""

import dataclasses

import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class Precision:
  param: jnp.dtype    # parameters as stored and updated
  compute: jnp.dtype  # matmuls and activations
  norm: jnp.dtype     # mean / variance inside LayerNorm and RMSNorm
  softmax: jnp.dtype  # attention logits and softmax
  loss: jnp.dtype     # LM-head log-softmax and cross-entropy

  @classmethod
  def from_config(cls, model_config) -> 'Precision':
    compute = DTYPES[model_config.compute_dtype]
    return cls(param=DTYPES[model_config.param_dtype], compute=compute,
               norm=jnp.float32 if model_config.norm_in_float32 else compute,
               softmax=jnp.float32 if model_config.softmax_in_float32 else compute,
               loss=jnp.float32 if model_config.loss_in_float32 else compute)
