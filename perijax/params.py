"""Parameter counts and training FLOPs per token of a config: `python -m perijax.params --config=configs/tiny.py`.

Counts come from the model itself (abstract init, nothing allocated), so they can never drift from the code.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from perijax import cli
from perijax import model as model_lib


def abstract_params(model_config):
  """Parameter shapes (jax.ShapeDtypeStruct, still boxed with their logical axes), without allocating."""
  model = model_lib.Transformer(ml_collections.FrozenConfigDict(model_config))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32)))['params']


def count_params(model_config):
  """{'total', 'embedding', 'non_embedding'}; the untied LM head counts as embedding (the paper's sizes)."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params(model_config)))
  total = sum(math.prod(leaf.shape) for _, leaf in leaves)
  embedding = sum(math.prod(leaf.shape) for path, leaf in leaves if path[0].key in ('embed', 'lm_head'))
  return {'total': total, 'embedding': embedding, 'non_embedding': total - embedding}


def train_flops_per_token(model_config, seq_len):
  """6 x (matmul parameters used per token, LM head included) + 12 x layers x seq_len x attention width.

  The PaLM convention (Chowdhery et al. 2022, App. B): forward + backward = 3 x forward, attention scores and values
  counted over the full (not causal-halved) sequence. It is the numerator of MFU.
  """
  matmul_params = count_params(model_config)['non_embedding'] + model_config.vocab_size * model_config.d_model
  attention_width = model_config.num_heads * model_lib.head_dim(model_config)
  return 6 * matmul_params + 12 * model_config.num_layers * seq_len * attention_width


def main(argv):
  del argv   # cli.run rejects positional arguments
  config = cli.config()
  counts = count_params(config.model)
  print(f"total parameters:          {counts['total']:>16,}")
  print(f"embedding parameters:      {counts['embedding']:>16,}")
  print(f"non-embedding parameters:  {counts['non_embedding']:>16,}  ({counts['non_embedding'] / 1e6:,.1f}M)")
  print(f'training FLOPs per token:  {train_flops_per_token(config.model, config.train.seq_len):>16,.0f}  '
        f'(seq_len {config.train.seq_len})')


if __name__ == '__main__':
  cli.define_config_flags()
  cli.run(main)
