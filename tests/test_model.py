"""The model against docs/paper.md: every placement's formula, causality, the variance law, scan == loop, statistics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from perijax import model as model_lib
from perijax import stats as stats_lib
from perijax.placement import PLACEMENTS, layer_placements, needs_final_norm
from tests import numpy_reference


def small_config(placement='pre', kind='rmsnorm', num_layers=3, d_model=32, **model_overrides):
  config = default.get_config()
  config.model.update(vocab_size=64, d_model=d_model, num_layers=num_layers, num_heads=4, scan_layers=False,
                      **model_overrides)
  config.model.norm.update(placement=placement, kind=kind, mix_post_layers=1)
  return config


def init_params(model_config, seed=0, length=8):
  model = model_lib.Transformer(ml_collections.FrozenConfigDict(model_config))
  tokens = jnp.zeros((1, length), jnp.int32)
  return model, nn.unbox(jax.jit(model.init)(jax.random.key(seed), tokens)['params'])


def forward(model, params, *inputs, collect_stats=False):
  """`model.apply`, jitted: one compiled program instead of hundreds of op-by-op ones (the slow part on CPU)."""
  return jax.jit(functools.partial(model.apply, collect_stats=collect_stats))({'params': params}, *inputs)


def randomize(params, seed):
  """Random weights everywhere, norm scales and biases too, so every parameter shows up in the output."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [leaf + 0.3 * jax.random.normal(k, leaf.shape) * (1.0 if leaf.ndim == 1 else 0.5)
         for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, new)


@pytest.mark.parametrize('kind', ['rmsnorm', 'layernorm'])
@pytest.mark.parametrize('placement', PLACEMENTS)
def test_forward_matches_numpy_float64_reference(placement, kind):
  config = small_config(placement, kind)
  model, params = init_params(config.model)
  params = randomize(params, seed=1)
  tokens = np.array([[3, 17, 5, 60, 2, 9, 33, 1]], np.int32)
  logits, _ = forward(model, params, jnp.asarray(tokens))
  placements = layer_placements(config.model.norm, config.model.num_layers)
  expected = numpy_reference.forward(jax.device_get(params), tokens[0], placements, kind, config.model.norm.eps,
                                     final_norm=needs_final_norm(placements[-1]))
  relative_error = np.abs(np.asarray(logits[0], np.float64) - expected).max() / np.abs(expected).max()
  assert relative_error < 1e-5


def test_peri_has_two_norms_per_sublayer_and_post_has_no_final_norm():
  _, peri = init_params(small_config('peri').model)
  _, post = init_params(small_config('post').model)
  assert {'attention_in_norm', 'attention_out_norm', 'mlp_in_norm', 'mlp_out_norm'} <= set(peri['layer_0'])
  assert 'final_norm' in peri and 'final_norm' not in post


@pytest.mark.slow
@pytest.mark.parametrize('placement', ['pre', 'peri', 'post'])
def test_changing_a_future_token_never_changes_earlier_logits(placement):
  model, params = init_params(small_config(placement).model, length=12)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % 64)
  before, _ = forward(model, params, tokens)
  after, _ = forward(model, params, changed)
  np.testing.assert_array_equal(np.asarray(before[:, :7]), np.asarray(after[:, :7]))
  assert not np.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.slow
def test_segment_ids_keep_packed_documents_apart():
  model, params = init_params(small_config('peri').model, length=10)
  first, second = jnp.array([[5, 6, 7, 8]]), jnp.array([[9, 10, 11, 12, 13, 14]])
  packed = jnp.concatenate([first, second], axis=1)
  segment_ids = jnp.array([[1] * 4 + [2] * 6])
  positions = jnp.array([list(range(4)) + list(range(6))])
  logits, _ = forward(model, params, packed, positions, segment_ids)
  alone, _ = forward(model, params, second)
  np.testing.assert_allclose(logits[:, 4:], alone, rtol=1e-5, atol=1e-5)


def residual_increment(placement, scale, layer=1):
  """Increment of residual variance across layer `layer`'s MLP sub-layer, its output projection scaled by `scale`."""
  config = small_config(placement, num_layers=3, d_model=256)
  model, params = init_params(config.model, length=64)
  params = jax.tree.map(lambda a: a, params)
  params[f'layer_{layer}']['mlp']['down']['kernel'] = params[f'layer_{layer}']['mlp']['down']['kernel'] * scale
  tokens = jax.random.randint(jax.random.key(3), (4, 64), 0, 64)
  _, stats = forward(model, params, tokens, collect_stats=True)
  var = np.asarray(stats['residual_var'], np.float64)
  return var[layer, 1] - var[layer, 0]  # after the MLP minus after the attention of the same layer


@pytest.mark.slow
def test_pre_ln_variance_increment_grows_with_weight_scale_squared():
  ratio = residual_increment('pre', 10.0) / residual_increment('pre', 1.0)
  assert abs(ratio / 100.0 - 1) < 0.10


@pytest.mark.slow
def test_peri_variance_increment_ignores_weight_scale():
  ratio = residual_increment('peri', 10.0) / residual_increment('peri', 1.0)
  assert abs(ratio - 1) < 0.01


@pytest.mark.slow
def test_peri_residual_variance_grows_linearly_with_depth_at_init():
  config = small_config('peri', num_layers=24, d_model=64)
  config.model.scan_layers = True
  model, params = init_params(config.model, length=32)
  tokens = jax.random.randint(jax.random.key(4), (4, 32), 0, 64)
  _, stats = forward(model, params, tokens, collect_stats=True)
  variance = np.asarray(stats['residual_var'][:, 1], np.float64)
  depth = np.arange(1, 25, dtype=np.float64)
  slope, intercept = np.polyfit(depth, variance, 1)
  r_squared = 1 - np.sum((variance - (slope * depth + intercept)) ** 2) / np.sum((variance - variance.mean()) ** 2)
  assert slope > 0 and r_squared > 0.99


@pytest.mark.slow
@pytest.mark.parametrize('placement, unroll', [('peri', 1), ('mix', 1), ('peri', 3)])
def test_scan_and_loop_stacks_agree_for_the_same_parameters(placement, unroll):
  config = small_config(placement, num_layers=4)
  config.model.norm.mix_post_layers = 2
  loop_model, loop_params = init_params(config.model)
  config.model.update(scan_layers=True, scan_unroll=unroll)  # 3 does not divide 4: a remainder iteration too
  scan_model, _ = init_params(config.model)
  # The scanned layout stacks each run of same-placement layers: layers_0 = layers 0..k-1, layers_1 = the rest.
  runs = model_lib.runs_of_equal(layer_placements(config.model.norm, 4))
  scan_params, first = {k: v for k, v in loop_params.items() if not k.startswith('layer_')}, 0
  for group, (_, count) in enumerate(runs):
    layers = [loop_params[f'layer_{i}'] for i in range(first, first + count)]
    scan_params[f'layers_{group}'] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    first += count
  tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, 64)
  loop_logits, loop_stats = forward(loop_model, loop_params, tokens, collect_stats=True)
  scan_logits, scan_stats = forward(scan_model, scan_params, tokens, collect_stats=True)
  np.testing.assert_allclose(loop_logits, scan_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loop_stats['residual_var'], scan_stats['residual_var'], rtol=1e-5)


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
  config = small_config('peri', num_layers=2)
  config.model.scan_layers = True
  model, params = init_params(config.model)
  tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, 64)
  loss = lambda m, p: jnp.mean(forward(m, p, tokens)[0] ** 2)
  expected = jax.grad(lambda p: loss(model, p))(params)
  for policy in ('minimal', 'full'):
    config.model.remat = policy
    remat_model = model_lib.Transformer(ml_collections.FrozenConfigDict(config.model))
    got = jax.grad(lambda p: loss(remat_model, p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), expected, got)


def test_fp16_overflow_counts_values_past_65504_and_non_finite():
  x = np.zeros((2, 3, 4), np.float32)
  x[0, 0, 0] = 70000.0      # past float16's max
  x[1, 2, 3] = -1e6         # past it, negative
  x[0, 1, 2] = 65504.0      # exactly the max: fits
  x[1, 0, 1] = np.inf
  x[1, 1, 1] = np.nan
  stats = jax.device_get(stats_lib.tensor_stats(jnp.asarray(x)))
  assert int(stats['fp16_overflow']) == 4


def test_fp16_overflow_is_counted_per_layer_in_the_model():
  config = small_config('none', num_layers=2)
  model, params = init_params(config.model)
  # Token 7's embedding is past float16's range in 3 of its 32 coordinates. With every sub-layer's output
  # projection zeroed and no sub-layer norm, the residual stream is the embedding all the way up.
  params['embed']['embedding'] = params['embed']['embedding'].at[7, :3].set(1e5)
  for layer in ('layer_0', 'layer_1'):
    params[layer]['attention']['out']['kernel'] *= 0
    params[layer]['mlp']['down']['kernel'] *= 0
  tokens = jnp.array([[7, 1, 2, 7, 3, 4, 5, 6]])
  _, stats = forward(model, params, tokens, collect_stats=True)
  residual_overflow = np.asarray(stats['residual_fp16_overflow'])
  assert residual_overflow.tolist() == [[6, 6], [6, 6]]  # 2 positions x 3 coordinates, after every sub-layer
  assert np.asarray(stats['output_fp16_overflow']).sum() == 0
  summary = stats_lib.layer_summary(jax.device_get(stats))
  assert summary['fp16_overflow'] == [12, 12]
  np.testing.assert_allclose(summary['fp16_headroom'], [1e5 / 65504] * 2, rtol=1e-6)
  assert len(summary['residual_var']) == 2


def test_layer_summary_matches_numpy():
  rng = np.random.default_rng(0)
  stats = {f'{w}_{k}': rng.uniform(0, 10, (3, 2)) for w in ('residual', 'output')
           for k in ('var', 'rms', 'max_abs', 'fp16_overflow')}
  summary = stats_lib.layer_summary(stats)
  np.testing.assert_allclose(summary['residual_var'], stats['residual_var'][:, 1])
  np.testing.assert_allclose(summary['max_abs'],
                             np.max(np.concatenate([stats['residual_max_abs'], stats['output_max_abs']], 1), 1))
  np.testing.assert_allclose(summary['mlp_out_var'], stats['output_var'][:, 1])


@pytest.mark.parametrize('placement', ['pre', 'peri'])
def test_einsum_attention_matches_dot_product_attention(placement):
  config = small_config(placement)
  model, params = init_params(config.model, length=10)
  tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, 64)
  segment_ids = jnp.array([[1] * 4 + [2] * 6, [1] * 10])
  config.model.attention_impl = 'einsum'
  einsum_model = model_lib.Transformer(ml_collections.FrozenConfigDict(config.model))
  expected, _ = forward(model, params, tokens, None, segment_ids)
  got, _ = forward(einsum_model, params, tokens, None, segment_ids)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_rms_norm_written_out_gradient_matches_autodiff():
  from perijax import norms
  x = jax.random.normal(jax.random.key(8), (2, 5, 3, 16)) * 3.0  # also the per-head (qk_norm) shape
  scale = jax.random.normal(jax.random.key(9), (16,))
  cotangent = jax.random.normal(jax.random.key(10), x.shape)
  plain = lambda x, s: x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-6) * s
  expected = jax.grad(lambda x, s: jnp.sum(plain(x, s) * cotangent), argnums=(0, 1))(x, scale)
  got = jax.grad(lambda x, s: jnp.sum(norms.rms_normalize(x, s, 1e-6) * cotangent), argnums=(0, 1))(x, scale)
  for e, g in zip(expected, got):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_grad_norms_match_numpy_per_layer_and_globally(scan_layers):
  config = small_config('mix', num_layers=4)
  config.model.scan_layers = scan_layers  # scanned: two stacks, layers_0 (post) and layers_1 (pre)
  config.model.norm.mix_post_layers = 1
  _, params = init_params(config.model)
  grads = randomize(params, seed=11)  # any tree of the parameters' layout will do
  global_norm, layer_norms = model_lib.grad_norms(grads)

  as_float64 = lambda tree: [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]
  if scan_layers:  # each stack's leaves carry its layers on the leading axis
    stacks = [as_float64(grads['layers_0']), as_float64(grads['layers_1'])]
    per_layer = [[leaf[i] for leaf in stack] for stack in stacks for i in range(len(stack[0]))]
  else:
    per_layer = [as_float64(grads[f'layer_{i}']) for i in range(4)]
  expected_layers = [np.sqrt(sum(np.sum(leaf ** 2) for leaf in leaves)) for leaves in per_layer]
  expected_global = np.sqrt(sum(np.sum(leaf ** 2) for leaf in as_float64(grads)))
  assert layer_norms.shape == (4,)
  np.testing.assert_allclose(layer_norms, expected_layers, rtol=1e-5)
  np.testing.assert_allclose(global_norm, expected_global, rtol=1e-5)
  # The embedding and final norm count in the global norm only: it must exceed the layers' own total.
  assert global_norm > np.sqrt(np.sum(np.square(expected_layers))) * (1 + 1e-4)
