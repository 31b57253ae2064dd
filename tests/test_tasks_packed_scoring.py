"""Packed zero-shot scoring with the real model: several requests per row give each one the log-likelihood it gets
alone in a row, because the model's segment mask and restarting positions keep packed documents apart."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from perijax import model as model_lib
from perijax.tasks import scoring

SEQ_LEN, BATCH, VOCAB = 48, 4, 64


@pytest.mark.slow
@pytest.mark.parametrize('placement,attention_impl', [('peri', 'xla'), ('post', 'einsum')])
def test_packed_loglikelihoods_equal_one_request_per_row(placement, attention_impl):
  config = default.get_config().model
  config.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, scan_layers=False,
                attention_impl=attention_impl, compute_dtype='float32')
  config.norm.placement = placement
  model = model_lib.Transformer(ml_collections.FrozenConfigDict(config))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))['params'])
  # Larger random weights than the init, so that a request reading its neighbour would change its scores visibly.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [leaf + 0.3 * jax.random.normal(key, leaf.shape)
                                        for leaf, key in zip(leaves, keys)])
  logprobs_fn = jax.jit(lambda inputs, positions, segment_ids: jax.nn.log_softmax(
      model.apply({'params': params}, inputs, positions, segment_ids)[0].astype(jnp.float32), axis=-1))
  rng = np.random.default_rng(0)
  requests = [(rng.integers(2, VOCAB, rng.integers(0, 30)).tolist(),
               rng.integers(2, VOCAB, rng.integers(1, 8)).tolist()) for _ in range(40)]
  requests.append((rng.integers(2, VOCAB, 60).tolist(), [5, 6]))  # left-truncated to the row, alone in it
  calls = []
  def counted(*arrays):
    calls.append(np.asarray(arrays[2]).max())
    return logprobs_fn(*arrays)
  packed = scoring.loglikelihoods(requests, counted, batch_size=BATCH, seq_len=SEQ_LEN, eos_id=1, packed=True)
  packed_calls, most_per_row = len(calls), max(calls)
  alone = scoring.loglikelihoods(requests, counted, batch_size=BATCH, seq_len=SEQ_LEN, eos_id=1, packed=False)
  assert len(calls) - packed_calls == 11 and packed_calls < 11 and most_per_row > 2  # 41 rows -> far fewer
  np.testing.assert_allclose([ll for ll, _ in packed], [ll for ll, _ in alone], rtol=0, atol=1e-5)
  assert [greedy for _, greedy in packed] == [greedy for _, greedy in alone]
  assert np.std([ll for ll, _ in alone]) > 1.0  # the scores differ from request to request: the check has teeth


@pytest.mark.slow
def test_benchmark_script_reports_rows_calls_and_equal_scores():
  from benchmarks import packed_scoring  # pylint: disable=g-import-not-at-top
  report = packed_scoring.measure(num_items=3, seq_len=512, batch_size=2)
  requests = packed_scoring.arc_like_requests(3)
  assert report['requests'] == len(requests) == 12 and report['one_per_row']['rows'] == 12
  assert report['one_per_row']['model_calls'] == 6 and report['packed']['rows'] < 12
  assert report['max_abs_diff'] <= 1e-5 and report['greedy_equal']
  assert all(context.startswith('Question: ') and context.endswith('\nAnswer:') for context, _ in requests)
