"""Initialization as configured, the norms' γ (init, frozen output γ, its summary) and the largest attention logit."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default, tiny
from perijax.evaluate import eval_lib
from perijax import metrics
from perijax import model as model_lib
from perijax import optimizer as optimizer_lib
from perijax import runs as runs_lib
from perijax import stats as stats_lib
from perijax import tables
from perijax import train as train_lib
from perijax import train_step as train_step_lib
from perijax.placement import layer_placements
from tests import numpy_reference


def model_config(placement='peri', num_layers=2, d_model=32, **overrides):
  config = default.get_config()
  config.model.update(**{'vocab_size': 64, 'd_model': d_model, 'num_layers': num_layers, 'num_heads': 4,
                         'scan_layers': False, **overrides})
  config.model.norm.update(placement=placement, mix_post_layers=1)
  return config


def init_params(config, length=8, seed=0):
  model = model_lib.Transformer(ml_collections.FrozenConfigDict(config.model))
  return model, nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))['params'])


# ---- initialization -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('depth_scaled', [True, False])
def test_drawn_weights_have_the_configured_std(depth_scaled):
  layers, std = 32, 0.05
  config = model_config('pre', num_layers=layers, d_model=64, tie_embeddings=False, scan_layers=True)
  config.model.init.update(std=std, depth_scaled_outputs=depth_scaled)
  _, params = init_params(config)
  stack = params['layers_0']
  scaled = std / math.sqrt(2 * layers) if depth_scaled else std
  kernels = {
      'attention out': (stack['attention']['out']['kernel'], scaled),
      'mlp down': (stack['mlp']['down']['kernel'], scaled),
      'query': (stack['attention']['query']['kernel'], std),
      'key': (stack['attention']['key']['kernel'], std),
      'value': (stack['attention']['value']['kernel'], std),
      'mlp gate': (stack['mlp']['gate']['kernel'], std),
      'mlp up': (stack['mlp']['up']['kernel'], std),
      'embedding': (params['embed']['embedding'], std),
      'lm head': (params['lm_head']['kernel'], std),
  }
  for name, (weights, expected) in kernels.items():
    weights = np.asarray(weights, np.float64).ravel()
    # The sample std of n normal draws has a relative standard error of 1/sqrt(2(n - 1)): allow 6 of them.
    tolerance = 6 / math.sqrt(2 * (weights.size - 1))
    assert abs(weights.std() / expected - 1) < tolerance, (name, weights.std(), expected)
    assert abs(weights.mean()) < 6 * expected / math.sqrt(weights.size), name


# ---- γ: initial value and the frozen output norms -------------------------------------------------------------------

def train_a_few_steps(config, steps=3):
  """Parameters before and after `steps` AdamW steps on random tokens (the trainer's own step, no mesh)."""
  config.train.update(seq_len=16, batch_size=4)
  config.optimizer.update(lr=1e-2, warmup_steps=0)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, steps)
  state = train_step_lib.unboxed(train_step_lib.init_train_state(jax.random.key(0), config, model, optimizer))
  before = jax.device_get(state.params)
  step = jax.jit(lambda s, b: train_step_lib.train_step(s, b, model=model, optimizer=optimizer,
                                                        train_config=config.train))
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': jnp.ones((4, 16)),
           'positions': jnp.broadcast_to(jnp.arange(16), (4, 16)), 'segment_ids': jnp.ones((4, 16), jnp.int32)}
  for _ in range(steps):
    state, _ = step(state, batch)
  return before, jax.device_get(state.params)


@pytest.mark.parametrize('placement, frozen, learnable', [
    ('peri', ('attention_out_norm', 'mlp_out_norm'), ('attention_in_norm', 'mlp_in_norm')),
    ('post', ('attention_norm', 'mlp_norm'), ()),
    ('output', ('attention_out_norm', 'mlp_out_norm'), ()),
])
@pytest.mark.slow
def test_frozen_output_scale_stays_bitwise_at_its_initial_value(placement, frozen, learnable):
  config = model_config(placement)
  config.model.norm.update(scale_init=0.5, freeze_out_scale=True, qk_norm=True)
  before, after = train_a_few_steps(config)
  for layer in ('layer_0', 'layer_1'):
    for name in frozen:
      assert np.array_equal(after[layer][name]['scale'], np.full(32, 0.5, np.float32)), (layer, name)
    for name in learnable:  # the input norms, QK-norms and other weights start at the same values and do move
      np.testing.assert_array_equal(before[layer][name]['scale'], 0.5)
      assert not np.array_equal(after[layer][name]['scale'], before[layer][name]['scale'])
    np.testing.assert_array_equal(before[layer]['attention']['query_norm']['scale'], 0.5)
    assert not np.array_equal(after[layer]['attention']['query_norm']['scale'], 0.5)
    assert not np.array_equal(after[layer]['mlp']['down']['kernel'], before[layer]['mlp']['down']['kernel'])
  if 'final_norm' in before:  # not a sub-layer's output norm: it learns
    assert not np.array_equal(after['final_norm']['scale'], before['final_norm']['scale'])


def test_output_scale_learns_when_not_frozen():
  config = model_config('peri')
  before, after = train_a_few_steps(config)
  np.testing.assert_array_equal(before['layer_0']['mlp_out_norm']['scale'], 1.0)
  assert not np.array_equal(after['layer_0']['mlp_out_norm']['scale'], before['layer_0']['mlp_out_norm']['scale'])


# ---- γ summary --------------------------------------------------------------------------------------------------

def randomized_scales(params, seed):
  """Every γ replaced by distinct random values, the rest untouched."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  new = [rng.uniform(0.1, 3.0, leaf.shape).astype(np.float32) if path[-1].key == 'scale' else leaf
         for path, leaf in leaves]
  return jax.tree.unflatten(treedef, new)


def expected_summary(params, placements):
  """Written out from docs/paper.md's placement table: which of a layer's norms read the sub-layer input, which its
  output."""
  names = {'post': ([], ['norm']), 'pre': (['norm'], []), 'peri': (['in_norm'], ['out_norm']),
           'pre_post': (['in_norm'], ['out_norm']), 'output': ([], ['out_norm']), 'none': ([], [])}
  expected = {}
  for kind in ('in', 'out', 'qk'):
    values = []
    for i, placement in enumerate(placements):
      layer = params[f'layer_{i}']
      if kind == 'qk':
        vectors = [layer['attention'][n]['scale'] for n in ('query_norm', 'key_norm')]
      else:
        vectors = [layer[f'{sub}_{n}']['scale'] for sub in ('attention', 'mlp')
                   for n in names[placement][kind == 'out']]
      values.append(np.concatenate(vectors).astype(np.float64) if vectors else None)
    for name, reduce in (('mean', np.mean), ('min', np.min), ('max', np.max)):
      expected[f'{kind}_norm_scale_{name}'] = [None if v is None else reduce(v) for v in values]
  scale = np.asarray(params['final_norm']['scale'], np.float64)
  expected.update(final_norm_scale_mean=scale.mean(), final_norm_scale_min=scale.min(),
                  final_norm_scale_max=scale.max())
  return expected


@pytest.mark.parametrize('scan_layers', [False, True])
def test_scale_summary_matches_numpy_per_layer_and_kind(scan_layers):
  config = model_config('mix', num_layers=4)
  config.model.norm.update(mix_post_layers=2, qk_norm=True)
  _, params = init_params(config)
  params = randomized_scales(params, seed=3)
  placements = layer_placements(config.model.norm, 4)
  expected = expected_summary(params, placements)
  if scan_layers:  # the same parameters in the scanned layout: layers_0 = the Post-LN layers, layers_1 = the rest
    params = {**{k: v for k, v in params.items() if not k.startswith('layer_')},
              'layers_0': jax.tree.map(lambda *a: np.stack(a), params['layer_0'], params['layer_1']),
              'layers_1': jax.tree.map(lambda *a: np.stack(a), params['layer_2'], params['layer_3'])}
  summary = stats_lib.scale_summary(jax.device_get(jax.jit(stats_lib.norm_scales)(params)), config.model)
  assert set(summary) == set(expected)
  for key, value in expected.items():
    if isinstance(value, list):
      assert [v is None for v in summary[key]] == [v is None for v in value], key
      np.testing.assert_allclose([v for v in summary[key] if v is not None], [v for v in value if v is not None],
                                 rtol=1e-12, err_msg=key)
    else:
      assert summary[key] == pytest.approx(value, rel=1e-12)
  assert summary['in_norm_scale_mean'][:2] == [None, None] and summary['out_norm_scale_mean'][2:] == [None, None]


def test_pre_ln_summary_has_no_output_norm_keys_and_none_is_kept_out_of_tensorboard():
  config = model_config('pre')
  _, params = init_params(config)
  summary = stats_lib.scale_summary(params, config.model)
  assert not any(key.startswith(('out_norm', 'qk_norm')) for key in summary)
  assert summary['in_norm_scale_min'] == [1.0, 1.0]
  assert metrics.scalars({'out_norm_scale_mean': [None, 2.0]}) == {'out_norm_scale_mean/layer_001': 2.0}


# ---- the largest attention logit ------------------------------------------------------------------------------------

def numpy_attention_logit_max(q, k, segment_ids):
  """max |q·k/√d| over causal, same-document, non-padding pairs, in float64; k's heads shared by groups of q's."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  length = q.shape[1]
  allowed = np.tril(np.ones((length, length), bool))[None]
  allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
  return np.abs(logits)[np.broadcast_to(allowed[:, None], logits.shape)].max()


@pytest.mark.parametrize('length, block', [(12, 4), (10, 4), (12, 256)])  # 3 blocks, 5 blocks of 2, one block
def test_max_attention_logit_matches_numpy_float64(length, block):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, length, 4, 8)).astype(np.float32) * 3
  k = rng.normal(size=(2, length, 2, 8)).astype(np.float32) * 3
  segment_ids = np.array([[1] * 5 + [2] * (length - 7) + [0] * 2, [1] * length], np.int32)
  q[0, -1] *= 100  # a padding query with the largest logits of all: it must not count
  got = stats_lib.max_attention_logit(jnp.asarray(q), jnp.asarray(k), jnp.asarray(segment_ids), block=block)
  expected = numpy_attention_logit_max(q, k, segment_ids)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  # A key in another document, however large, does not count either.
  k2 = k.copy()
  k2[0, 0] *= 100
  segment_ids2 = segment_ids.copy()
  segment_ids2[0, 0] = 3  # token 0 is now its own document: only query 0 sees it
  q2 = q.copy()
  q2[0, 0] = 0
  got = stats_lib.max_attention_logit(jnp.asarray(q2), jnp.asarray(k2), jnp.asarray(segment_ids2), block=block)
  assert float(got) == pytest.approx(numpy_attention_logit_max(q2, k2, segment_ids2), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('attention_impl', ['xla', 'einsum'])
def test_model_reports_each_layers_largest_logit_as_numpy_float64_computes_it(attention_impl):
  config = model_config('peri', num_layers=3, num_kv_heads=2, attention_impl=attention_impl)
  model, params = init_params(config, length=10)
  params = jax.tree.map(lambda a: a * 10 if a.ndim > 1 else a, params)  # larger weights: logits well away from 0
  tokens = np.array([[3, 17, 5, 60, 2, 9, 33, 1, 0, 0], [8, 8, 1, 2, 40, 41, 42, 7, 6, 5]], np.int32)
  segment_ids = np.array([[1] * 4 + [2] * 4 + [0] * 2, [1] * 10], np.int32)
  apply = jax.jit(lambda p, t, s: model.apply({'params': p}, t, None, s, collect_stats=True))
  _, stats = apply(params, jnp.asarray(tokens), jnp.asarray(segment_ids))
  summary = stats_lib.layer_summary(jax.device_get(stats))

  # NumPy float64: the Peri-LN forward of docs/paper.md with grouped-query, document-masked attention.
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(params))
  norm = lambda x, q: numpy_reference.norm(x, q, 'rmsnorm', config.model.norm.eps)
  expected, x = [], p64['embed']['embedding'][tokens]
  allowed = (np.tril(np.ones((10, 10), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None]
  for i in range(3):
    layer = p64[f'layer_{i}']
    h = norm(x, layer['attention_in_norm'])
    q, k = (np.stack([numpy_reference.rope(a)
                      for a in np.einsum('btd,dnh->btnh', h, layer['attention'][name]['kernel'])])
            for name in ('query', 'key'))
    v = np.einsum('btd,dnh->btnh', h, layer['attention']['value']['kernel'])
    expected.append(numpy_attention_logit_max(q, k, segment_ids))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    logits = np.where(allowed, np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(8), -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    out = np.einsum('bnts,bsnh->btnh', weights / weights.sum(-1, keepdims=True), v)
    x = x + norm(np.einsum('btnh,nhd->btd', out, layer['attention']['out']['kernel']), layer['attention_out_norm'])
    x = x + norm(np.stack([numpy_reference.mlp(row, layer['mlp']) for row in norm(x, layer['mlp_in_norm'])]),
                 layer['mlp_out_norm'])
  assert min(expected) > 1.0
  np.testing.assert_allclose(summary['attn_logit_max'], expected, rtol=1e-4)


def test_logit_max_is_traced_only_on_statistics_steps():
  config = model_config('pre')
  model, params = init_params(config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  plain = jax.make_jaxpr(lambda p: model.apply({'params': p}, tokens))(params)
  with_stats = jax.make_jaxpr(lambda p: model.apply({'params': p}, tokens, collect_stats=True))(params)
  assert 'bkgts' not in str(plain) and str(plain).count('dot_general') < str(with_stats).count('dot_general')


# ---- where the numbers go ---------------------------------------------------------------------------------------

def test_report_shows_the_gamma_table_per_run(tmp_path):
  workdir = tmp_path / 'peri'
  workdir.mkdir()
  line = {'step': 20, 'loss': 2.0, 'residual_var': [1.0, 2.0],
          'in_norm_scale_mean': [1.5, 0.75], 'in_norm_scale_min': [0.5, 0.25], 'in_norm_scale_max': [2.0, 1.25],
          'out_norm_scale_mean': [None, 3.0], 'out_norm_scale_min': [None, 2.5], 'out_norm_scale_max': [None, 3.5],
          'final_norm_scale_mean': 1.125, 'final_norm_scale_min': 0.875, 'final_norm_scale_max': 1.5}
  (workdir / 'metrics.jsonl').write_text(json.dumps(line) + '\n')
  text = tables.scale_tables([runs_lib.load_run(str(workdir))])
  assert 'peri (step 20)' in text and 'input norms' in text and 'output norms' in text
  rows = [row.split() for row in text.splitlines()]
  assert ['1', '1.5', '[0.5,', '2]', '-'] in rows
  assert ['2', '0.75', '[0.25,', '1.25]', '3', '[2.5,', '3.5]'] in rows
  assert ['final', 'norm', '1.125', '[0.875,', '1.5]'] in rows


@pytest.mark.slow
def test_training_and_evaluation_write_gamma_and_logit_maxima(corpus_data_dir, tmp_path):
  config = default.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=2)
  config.model.norm.update(placement='mix', mix_post_layers=1, scale_init=0.5, freeze_out_scale=True)
  config.train.update(steps=2, batch_size=8, seq_len=32, log_every=1, stats_every=2)
  config.optimizer.update(warmup_steps=0)
  config.checkpoint.update(every=0, async_save=False)
  config.data.update(data_dir=corpus_data_dir, eval_max_batches=1, prefetch=0)
  config.eval.update(batch_size=8, tasks=())
  workdir = str(tmp_path / 'run')
  train_lib.train(config, workdir, devices=jax.devices()[:2])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert 'in_norm_scale_mean' not in lines[0] and 'attn_logit_max' not in lines[0]  # step 1: not a statistics step
  logged = lines[-1]
  assert len(logged['attn_logit_max']) == 2 and all(v > 0 for v in logged['attn_logit_max'])
  # Layer 0 is Post-LN (its norm an output norm, frozen), layer 1 Pre-LN (an input norm, learning).
  assert [logged[f'out_norm_scale_{n}'] for n in ('min', 'max')] == [[0.5, None], [0.5, None]]
  assert logged['in_norm_scale_mean'][0] is None and logged['in_norm_scale_max'][1] != 0.5

  evaluator = eval_lib.Evaluator(workdir, eval_lib.load_run_config(workdir), devices=jax.devices()[:2])
  result = evaluator.evaluate(2)
  eval_lib.write_result(workdir, result)  # TensorBoard leaves the None (no such norm) out
  assert result['norm_scales'] == {k: v for k, v in logged.items()
                                   if k.endswith(('_scale_mean', '_scale_min', '_scale_max'))}
  assert len(result['layers']['attn_logit_max']) == 2


def test_a_config_json_from_before_init_and_gamma_fields_reads_back_as_it_meant(tmp_path):
  old = tiny.get_config().to_dict()
  del old['model']['init']
  old['model']['init_std'] = 0.01
  for field in ('scale_init', 'freeze_out_scale'):
    del old['model']['norm'][field]
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config = eval_lib.load_run_config(str(tmp_path))
  assert config.model.init.to_dict() == {'std': 0.01, 'depth_scaled_outputs': False}
  assert config.model.norm.scale_init == 1.0 and config.model.norm.freeze_out_scale is False
  assert 'init_std' not in config.model
  assert sorted(config.model.init.keys()) == sorted(default.get_config().model.init.keys())
  os.remove(tmp_path / 'config.json')
