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
    reductions = (jnp.float32 if getattr(model_config, f'{kind}_in_float32') else compute
                  for kind in ('norm', 'softmax', 'loss'))
    return cls(DTYPES[model_config.param_dtype], compute, *reductions)
