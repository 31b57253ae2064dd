"""Per-layer statistics against NumPy float64: the increment decomposition, massive activations with planted values,
padding masked out, and nothing traced on steps that are not statistics steps."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from perijax import config as config_lib
from perijax.evaluate import eval_lib
from perijax import stats as stats_lib
from perijax import train_step as train_step_lib
from perijax.placement import layer_placements, needs_final_norm
from tests import numpy_reference
from tests.test_model import init_params, randomize, small_config


def lower_median(values):
  return np.sort(values)[(values.size - 1) // 2]


def reference_sublayers(placement, tokens, num_layers=2):
  """(model summary, [(before, after, raw output)] per sub-layer from the float64 reference) for one sequence."""
  config = small_config(placement, num_layers=num_layers)
  model, params = init_params(config.model, length=tokens.size)
  params = randomize(params, seed=3)
  _, stats = jax.jit(functools.partial(model.apply, collect_stats=True))({'params': params}, jnp.asarray(tokens[None]))
  placements = layer_placements(config.model.norm, num_layers)
  sublayers = []
  numpy_reference.forward(jax.device_get(params), tokens, placements, 'rmsnorm', config.model.norm.eps,
                          needs_final_norm(placements[-1]), sublayers=sublayers)
  return stats_lib.layer_summary(jax.device_get(stats)), sublayers


@pytest.mark.parametrize('placement', ['pre', 'peri', 'post'])
def test_increment_decomposition_matches_numpy_float64(placement):
  tokens = np.array([3, 17, 5, 60, 2, 9, 33, 1, 40, 41, 7, 12], np.int32)
  summary, sublayers = reference_sublayers(placement, tokens)
  for index, (before, after, _) in enumerate(sublayers):
    layer, name = index // 2, ('attn', 'mlp')[index % 2]
    delta = after - before   # for post-LN the net change N(x + F) - x, as documented
    increment = np.mean(after.var(-1) - before.var(-1))
    cross = np.mean(np.mean((before - before.mean(-1, keepdims=True)) * (delta - delta.mean(-1, keepdims=True)), -1))
    scale = np.mean(after.var(-1)) + np.mean(before.var(-1))
    assert summary[f'{name}_increment_var'][layer] == pytest.approx(increment, abs=1e-5 * scale)
    assert summary[f'{name}_delta_var'][layer] == pytest.approx(np.mean(delta.var(-1)), rel=1e-4, abs=1e-6 * scale)
    assert summary[f'{name}_cross_cov'][layer] == pytest.approx(cross, abs=1e-5 * scale)
    # The identity the decomposition rests on, exact in float64.
    assert increment == pytest.approx(np.mean(delta.var(-1)) + 2 * cross, rel=1e-9, abs=1e-12)
  assert summary['residual_var'] == pytest.approx([np.mean(after.var(-1)) for _, after, _ in sublayers[1::2]],
                                                  rel=1e-4)


def test_massive_activations_of_the_model_match_numpy_float64():
  tokens = np.array([3, 17, 5, 60, 2, 9, 33, 1, 40, 41, 7, 12], np.int32)
  summary, sublayers = reference_sublayers('pre', tokens)
  k = stats_lib.MASSIVE_K
  for index, (_, after, raw) in enumerate(sublayers):
    layer = index // 2
    checks = [(summary[f'massive_{("attn", "mlp")[index % 2]}_out'][layer], raw)]
    if index % 2:
      checks.append((summary['massive_residual'][layer], after))
    for entry, tensor in checks:
      magnitude = np.abs(tensor)
      order = np.argsort(-magnitude, axis=None)[:k]
      position, channel = np.unravel_index(order, magnitude.shape)
      np.testing.assert_allclose(entry['abs'], magnitude.flat[order], rtol=1e-4)
      assert entry['channel'] == channel.tolist() and entry['position'] == position.tolist()
      assert entry['token'] == tokens[position].tolist()
      assert entry['median'] == pytest.approx(lower_median(magnitude.ravel()), rel=1e-3)
      np.testing.assert_allclose(entry['ratio'], np.asarray(entry['abs']) / entry['median'], rtol=1e-9)


def planted_stream():
  """A [2, 16, 64] stream of N(0, 0.1²) noise with three planted massive values and padding holding a bigger one."""
  x = np.random.default_rng(0).normal(0, 0.1, (2, 16, 64))
  x[0, 0, 7], x[1, 5, 7], x[1, 0, 3] = 500.0, -800.0, 300.0
  x[1, 14, 9] = 1e4                 # a padding token: must never show up
  mask = np.ones((2, 16))
  mask[1, 12:] = 0
  return x, mask


def test_planted_massive_values_are_found_with_their_place_and_ratio():
  x, mask = planted_stream()
  stats = jax.device_get(jax.jit(functools.partial(stats_lib.massive_stats, k=4))(
      jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  real = np.abs(x)[mask > 0]
  noise_max = np.sort(real.ravel())[-4]
  np.testing.assert_allclose(stats['massive_abs'], [800, 500, 300, noise_max], rtol=1e-6)
  assert stats['massive_token_index'][:3].tolist() == [16 + 5, 0, 16 + 0]   # flat batch x length + t
  assert stats['massive_channel'][:3].tolist() == [7, 7, 3]
  median = lower_median(real.ravel())
  assert float(stats['median_abs']) == pytest.approx(median, rel=1e-4)
  entry = {'abs': stats['massive_abs'].tolist(), 'ratio': (stats['massive_abs'] / stats['median_abs']).tolist()}
  assert stats_lib.massive_flags([entry]) == [3]                      # |x| > 100 and > 1000 x median
  assert stats_lib.massive_flags([entry], abs_threshold=400) == [2]
  assert stats_lib.massive_flags([entry], ratio_threshold=800 / median * 1.01) == [0]


def test_median_is_the_lower_median_and_zero_when_half_the_entries_are_zero():
  values = np.random.default_rng(1).lognormal(0, 3, (7, 33))   # 231 entries over many octaves
  real = np.ones((7, 1), bool)
  assert float(stats_lib.median_abs(jnp.asarray(values, jnp.float32), real)) == pytest.approx(
      lower_median(values.ravel()), rel=1e-4)
  values[:4] = 0.0
  assert float(stats_lib.median_abs(jnp.asarray(values, jnp.float32), real)) == 0.0


def test_tensor_stats_ignore_padding():
  x, mask = planted_stream()
  stats = jax.device_get(stats_lib.tensor_stats(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
  real = x[mask > 0]
  assert float(stats['var']) == pytest.approx(np.mean(real.var(-1)), rel=1e-5)
  assert float(stats['rms']) == pytest.approx(np.sqrt(np.mean(real ** 2)), rel=1e-5)
  assert float(stats['max_abs']) == 800.0


def model_stats(model, params, tokens, segment_ids):
  _, stats = jax.jit(functools.partial(model.apply, collect_stats=True))({'params': params}, tokens, None, segment_ids)
  return stats_lib.layer_summary(jax.device_get(stats))


@pytest.mark.slow
def test_half_padded_batch_has_the_statistics_of_its_unpadded_half():
  model, params = init_params(small_config('pre', num_layers=2).model, length=16)
  params = randomize(params, seed=4)
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 2, 64)
  padded_ids = jnp.array([[1] * 8 + [0] * 8] * 2)
  padded = model_stats(model, params, tokens, padded_ids)
  alone = model_stats(model, params, tokens[:, :8], jnp.ones((2, 8), jnp.int32))
  assert padded.keys() == alone.keys()
  for key, value in alone.items():
    if key.startswith('massive_'):
      for got, expected in zip(padded[key], value):
        assert (got['token'], got['position'], got['channel']) == (expected['token'], expected['position'],
                                                                   expected['channel'])
        np.testing.assert_allclose(got['abs'], expected['abs'], rtol=1e-5)
        assert got['median'] == pytest.approx(expected['median'], rel=1e-5)
    else:
      np.testing.assert_allclose(padded[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
  # The same tokens counted as real (a second document, segment 2) change the statistics: the mask is what matters.
  counted = model_stats(model, params, tokens, jnp.array([[1] * 8 + [2] * 8] * 2))
  assert not np.allclose(counted['residual_var'], alone['residual_var'], rtol=1e-3)


def test_embedding_planted_massive_value_is_located_by_token_position_and_channel():
  config = small_config('none', num_layers=2)
  model, params = init_params(config.model)
  params['embed']['embedding'] = params['embed']['embedding'].at[7, 5].set(400.0)
  for layer in ('layer_0', 'layer_1'):   # sub-layers add nothing: the stream is the embedding all the way up
    params[layer]['attention']['out']['kernel'] *= 0
    params[layer]['mlp']['down']['kernel'] *= 0
  tokens = jnp.array([[3, 1, 2, 7, 3, 4, 5, 6]])
  summary = model_stats(model, params, tokens, None)
  for entry in summary['massive_residual']:
    assert (entry['token'][0], entry['position'][0], entry['channel'][0], entry['abs'][0]) == (7, 3, 5, 400.0)
    assert entry['ratio'][0] > 1000
  assert stats_lib.massive_flags(summary['massive_residual']) == [1, 1]
  assert stats_lib.massive_flags(summary['massive_mlp_out']) == [0, 0]


def test_eval_merges_massive_activations_of_batches_as_the_top_k_of_all():
  rng = np.random.default_rng(2)
  per_batch = []
  for _ in range(3):
    batch = {f'{w}_{s}': rng.uniform(0, 1, (2, 2)) for w in ('residual', 'output')
             for s in ('var', 'rms', 'max_abs', 'fp16_overflow')}
    for w in ('residual', 'output'):
      batch[f'{w}_median_abs'] = rng.uniform(0.5, 1, (2, 2))
      batch[f'{w}_massive_abs'] = -np.sort(-rng.uniform(0, 100, (2, 2, 4)), axis=-1)
      for field in ('token', 'position', 'channel'):
        batch[f'{w}_massive_{field}'] = rng.integers(0, 1000, (2, 2, 4))
    per_batch.append(batch)
  combined = eval_lib.aggregate_stats(per_batch)
  values = np.concatenate([b['residual_massive_abs'] for b in per_batch], -1)
  channels = np.concatenate([b['residual_massive_channel'] for b in per_batch], -1)
  order = np.argsort(-values, -1)[..., :4]
  np.testing.assert_array_equal(combined['residual_massive_abs'], np.take_along_axis(values, order, -1))
  np.testing.assert_array_equal(combined['residual_massive_channel'], np.take_along_axis(channels, order, -1))
  np.testing.assert_allclose(combined['output_median_abs'], np.mean([b['output_median_abs'] for b in per_batch], 0))
  summary = stats_lib.layer_summary(combined)
  assert len(summary['massive_attn_out']) == 2 and len(summary['massive_residual'][0]['abs']) == 4


def primitives(jaxpr):
  """Every primitive name in a jaxpr, sub-jaxprs (scan, cond, remat) included."""
  names = set()
  for equation in jaxpr.eqns:
    names.add(equation.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(equation.params):
      names |= primitives(sub)
  return names


def test_statistics_cost_nothing_on_steps_that_are_not_statistics_steps(monkeypatch):
  config = small_config('peri', num_layers=2)
  config.model.scan_layers = True
  config.train.update(seq_len=8, batch_size=2)
  model = train_step_lib.make_model(config)
  from perijax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  state = train_step_lib.unboxed(train_step_lib.init_train_state(jax.random.key(0), config, model, optimizer))
  batch = {'inputs': jnp.ones((2, 8), jnp.int32), 'targets': jnp.ones((2, 8), jnp.int32),
           'positions': jnp.broadcast_to(jnp.arange(8), (2, 8)), 'segment_ids': jnp.ones((2, 8), jnp.int32),
           'weights': jnp.ones((2, 8), jnp.float32)}
  step = lambda collect: jax.make_jaxpr(functools.partial(
      train_step_lib.train_step, model=model, optimizer=optimizer, train_config=config.train,
      collect_stats=collect))(state, batch)
  with_stats, without_stats = step(True), step(False)
  assert 'top_k' in primitives(with_stats.jaxpr) and 'top_k' not in primitives(without_stats.jaxpr)
  assert len(without_stats.jaxpr.eqns) < len(with_stats.jaxpr.eqns)

  def untraceable(*args, **kwargs):
    raise AssertionError('statistics traced on a step that is not a statistics step')
  for name in ('sublayer_stats', 'token_mask', 'locate_tokens', 'tensor_stats', 'massive_stats', 'increment_stats'):
    monkeypatch.setattr(stats_lib, name, untraceable)
  step(False)   # traces without touching any statistic
  with pytest.raises(AssertionError, match='not a statistics step'):
    step(True)


@pytest.mark.parametrize('field, value', [('massive_k', 0), ('massive_k', 2.5), ('massive_abs_threshold', -1.0),
                                          ('massive_ratio_threshold', 0)])
def test_bad_massive_activation_fields_are_named(field, value):
  config = default.get_config()
  with config.ignore_type():   # as a hand-edited config.json could have it
    config.train[field] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.train.{field} = '):
    config_lib.validate(config)
