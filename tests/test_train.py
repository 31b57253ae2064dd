"""Sharded float16 training: the same run on any mesh, loss scaling that skips overflowing steps, multi-process."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import tiny
from perijax import config as config_lib
from perijax import optimizer as optimizer_lib
from perijax import sharding as sharding_lib
from perijax import train as train_lib
from perijax import train_step as train_step_lib
from perijax.data import tokenizers
from tests import numpy_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(data_dir, steps=10):
  config = tiny.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=4)
  # stats_every=1: every step collects the statistics, so one program compiles (the final step always collects them)
  config.train.update(steps=steps, batch_size=8, seq_len=32, log_every=1, stats_every=1)
  config.optimizer.update(warmup_steps=2)
  config.data.data_dir = data_dir
  config.checkpoint.every = 0
  return config


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


MESHES = {
    'data8': dict(data=8, fsdp=1, tensor=1),
    'data2_fsdp2_tensor2': dict(data=2, fsdp=2, tensor=2),
    'fsdp8': dict(data=1, fsdp=8, tensor=1),
}


@pytest.fixture(scope='module')
def single_device_losses(corpus_data_dir, tmp_path_factory):
  config = small_config(corpus_data_dir)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  workdir = str(tmp_path_factory.mktemp('one_device'))
  train_lib.train(config, workdir, devices=jax.devices()[:1])
  return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', MESHES)
def test_same_losses_on_every_mesh(mesh, corpus_data_dir, tmp_path, single_device_losses):
  config = small_config(corpus_data_dir)
  config.mesh.update(**MESHES[mesh])
  train_lib.train(config, str(tmp_path))
  got = losses(str(tmp_path))
  assert len(got) == 10 and got[-1] < got[0]
  np.testing.assert_allclose(got, single_device_losses, rtol=2e-5)


def test_parameters_are_sharded_as_the_rules_say(corpus_data_dir):
  config = small_config(corpus_data_dir)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding_lib.make_mesh(config.mesh)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, 10)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.logical_rules(config.mesh)):
    state, _ = train_step_lib.create_train_state(config, model, optimizer, mesh)
  layers = state.params['layers_0']
  # (layers, embed, mlp): layers replicated, embed over fsdp (FSDP), mlp width over tensor (tensor parallelism).
  assert layers['mlp']['gate']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor')
  assert layers['mlp']['down']['kernel'].sharding.spec == P(None, 'tensor', 'fsdp')
  assert layers['attention']['query']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert state.params['embed']['embedding'].sharding.spec == P('tensor', 'fsdp')
  # Adam's moments follow their parameters.
  adam = state.opt_state[1][0]
  assert adam.mu['layers_0']['mlp']['gate']['kernel'].sharding.spec == P(None, 'fsdp', 'tensor')
  shard = layers['mlp']['gate']['kernel'].addressable_shards[0].data
  assert shard.shape == (2, 32 // 2, 128 // 2)


def run_steps(config, data_dir, steps, mutate_params=None):
  """Runs the jitted train step by hand; returns [(state before, metrics)] per step and the final state."""
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.logical_rules(config.mesh)
  model = train_step_lib.make_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, config.train.steps)
  from perijax.data import pipeline
  iterator = pipeline.make_train_iterator(config.data, tokenizers.make_tokenizer(config.data),
                                          batch_size=config.train.batch_size, seq_len=config.train.seq_len, seed=0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = train_step_lib.create_train_state(config, model, optimizer, mesh)
    if mutate_params:
      state = state.replace(params=mutate_params(state.params))
    step = jax.jit(functools.partial(train_step_lib.train_step, model=model, optimizer=optimizer,
                                     train_config=config.train))
    history = []
    for _ in range(steps):
      before = jax.device_get(state)
      state, metrics = step(state, next(iterator))
      history.append((before, jax.device_get(metrics)))
  return history, jax.device_get(state)


@pytest.mark.slow
def test_float16_overflow_is_skipped_and_the_scale_halves(corpus_data_dir):
  # The scale starts where float16 gradients are finite and doubles every other finite step until scaled gradients
  # really overflow float16 (2^20 does at init: see logged_lines); each overflow halves it again.
  config = small_config(corpus_data_dir, steps=12)
  config.model.compute_dtype = 'float16'
  config.train.loss_scale_growth_interval = 1
  history, final = run_steps(config, corpus_data_dir, 12)
  states = [before for before, _ in history] + [final]
  finite = [bool(metrics['grads_finite']) for _, metrics in history]
  assert finite[0] and not all(finite)  # the scale settled at once; then at least one overflow
  for step, (before, metrics) in enumerate(history):
    after = states[step + 1]
    assert not metrics['forward_overflow'] and metrics['initial_scale_backoffs'] == 0
    assert metrics['skipped_steps'] == finite[:step + 1].count(False)
    if not finite[step]:  # a skipped step: params and optimizer state bitwise unchanged
      jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
      jax.tree.map(np.testing.assert_array_equal, before.opt_state, after.opt_state)
    elif metrics['schedule_count'] > 0:  # a finite step updates (but warmup's first lr is 0)
      assert not np.array_equal(before.params['embed']['embedding'], after.params['embed']['embedding'])
  assert [float(s.loss_scale.scale) for s in states[1:]] == numpy_reference.expected_loss_scales(65536.0, finite, 1)
  assert final.skipped_steps == finite.count(False)
  assert history[-1][1]['loss'] < history[0][1]['loss']  # training went on and the loss still fell


def test_float16_scale_grows_back_after_a_run_of_good_steps(corpus_data_dir):
  config = small_config(corpus_data_dir, steps=6)
  config.model.compute_dtype = 'float16'
  config.train.loss_scale_growth_interval = 2
  history, final = run_steps(config, corpus_data_dir, 6)
  scales = [float(h[0].loss_scale.scale) for h in history] + [float(final.loss_scale.scale)]
  assert scales[0] == 65536.0 and scales[-1] > scales[0]


def test_forward_overflow_is_reported_as_such(corpus_data_dir):
  config = small_config(corpus_data_dir, steps=2)
  config.model.compute_dtype = 'float16'

  def overflow_embedding(params):  # every embedding past float16's range: the forward pass itself overflows
    params['embed']['embedding'] = params['embed']['embedding'] * 0 + 1e5
    return params

  history, final = run_steps(config, corpus_data_dir, 2, overflow_embedding)
  assert history[0][1]['forward_overflow'] and final.forward_overflows == 2 and final.skipped_steps == 2


def test_pure_float16_keeps_parameters_and_moments_in_float16(corpus_data_dir):
  config = small_config(corpus_data_dir, steps=3)
  config.model.update(compute_dtype='float16', param_dtype='float16')
  history, final = run_steps(config, corpus_data_dir, 3)
  assert all(leaf.dtype == np.float16 for leaf in jax.tree.leaves(final.params))
  adam = final.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
  assert all(leaf.dtype == np.float16 for leaf in jax.tree.leaves((adam.mu, adam.nu)))
  assert np.isfinite(history[-1][1]['loss'])


@pytest.mark.parametrize('change, message', [
    (dict(batch_size=6), 'not divisible by data x fsdp = 4'),
    (dict(mesh=dict(data=3, fsdp=1, tensor=1)), 'has 3 devices but there are 8'),
    (dict(mesh=dict(data=1, fsdp=1, tensor=8)), r"do not divide evenly over the mesh: .*heads.*8 ways|"
                                                r"do not divide evenly over the mesh"),
])
def test_bad_shapes_fail_before_compiling(change, message, corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir)
  config.mesh.update(data=4, fsdp=1, tensor=2)
  if 'batch_size' in change:
    config.train.batch_size = change['batch_size']
  if 'mesh' in change:
    config.mesh.update(**change['mesh'])
  with pytest.raises(sharding_lib.ShardingError, match=message):
    train_lib.train(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(corpus_data_dir, tmp_path, free_port):
  overrides = ['--config=configs/tiny.py', f'--config.data.data_dir={corpus_data_dir}', '--config.model.d_model=32',
               '--config.model.num_layers=2', '--config.train.steps=6', '--config.train.batch_size=8',
               '--config.train.seq_len=32', '--config.train.log_every=1', '--config.checkpoint.every=0',
               '--config.data.process_split=rows', '--config.train.stats_every=1']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  single = str(tmp_path / 'single')   # this process's 8 devices, the config loaded from the same flags
  assert jax.device_count() == 8
  train_lib.train(config_lib.load(os.path.join(REPO, 'configs', 'tiny.py'), overrides[1:]), single)
  multi, port = str(tmp_path / 'multi'), free_port
  processes = [subprocess.Popen([sys.executable, '-m', 'perijax.train', f'--workdir={multi}', *overrides,
                                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                                 f'--process_id={i}'], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4'))
               for i in range(2)]
  outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
  assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
  np.testing.assert_allclose(losses(multi), losses(single), rtol=2e-5)
  assert len(losses(multi)) == 6


def test_spike_rule_is_k_times_the_running_median_once_the_window_is_full():
  history = jnp.array([1.0, 2.0, 3.0, 2.0, 1.0])  # median 2
  assert bool(train_step_lib.is_spike(jnp.float32(6.5), history, 3.0))
  assert not bool(train_step_lib.is_spike(jnp.float32(5.5), history, 3.0))
  assert not bool(train_step_lib.is_spike(jnp.float32(100.0), history.at[0].set(jnp.nan), 3.0))  # window not full
  assert not bool(train_step_lib.is_spike(jnp.float32(jnp.inf), history, 3.0))  # an overflow is a skip, not a spike


def test_weight_decay_skips_norms_and_biases():
  params = {'layers_0': {'attention_norm': {'scale': 1.0, 'bias': 0.0}, 'mlp': {'up': {'kernel': 1.0}}},
            'embed': {'embedding': 1.0}}
  mask = optimizer_lib.decay_mask(params)
  assert mask == {'layers_0': {'attention_norm': {'scale': False, 'bias': False}, 'mlp': {'up': {'kernel': True}}},
                  'embed': {'embedding': True}}


def test_schedule_warms_up_then_decays_to_the_end_factor(corpus_data_dir):
  config = small_config(corpus_data_dir)
  config.optimizer.update(lr=1.0, warmup_steps=10, end_lr_factor=0.1)
  for kind in ('cosine', 'linear'):
    config.optimizer.schedule = kind
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, 110)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0) and float(schedule(110)) == pytest.approx(0.1)


def accumulation_setup(compute_dtype='float32', param_dtype='float32', initial_loss_scale=2.0 ** 15):
  """(model, optimizer, state, jitted train_step) of a 2-layer model on one device, and two micro-batches of 4 rows
  with different numbers of target tokens."""
  config = tiny.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=4, compute_dtype=compute_dtype, param_dtype=param_dtype)
  config.train.update(seq_len=16, initial_loss_scale=initial_loss_scale)
  config.optimizer.update(warmup_steps=0, lr=1e-2)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  model, optimizer = train_step_lib.make_model(config), optimizer_lib.make_optimizer(config.optimizer, 10)
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh):
    state, _ = train_step_lib.create_train_state(config, model, optimizer, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, config.model.vocab_size, (2, 4, 17))
  weights = np.ones((2, 4, 16), np.float32)
  weights[1, :, 10:] = 0  # the second micro-batch has fewer target tokens: its mean loss weighs as much
  batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:], 'weights': weights,
           'positions': np.broadcast_to(np.arange(16), (2, 4, 16)), 'segment_ids': np.ones((2, 4, 16), np.int32)}
  step = jax.jit(functools.partial(train_step_lib.train_step, model=model, optimizer=optimizer,
                                   train_config=config.train))
  return model, optimizer, state, step, {k: jnp.asarray(v) for k, v in batch.items()}


def test_gradient_accumulation_is_one_update_on_the_mean_gradient_of_the_micro_batches():
  model, optimizer, state, step, batch = accumulation_setup()
  new_state, metrics = step(state, batch)
  # Reference: each micro-batch's loss and gradient on its own, averaged, then one optimizer update.
  loss_and_grads = jax.jit(jax.value_and_grad(lambda p, micro: train_step_lib.compute_loss(p, micro, model)[0]))
  per_micro = [loss_and_grads(state.params, {k: v[i] for k, v in batch.items()}) for i in range(2)]
  mean_grads = jax.tree.map(lambda *g: sum(g) / 2, *[grads for _, grads in per_micro])
  updates, _ = jax.jit(optimizer.update)(mean_grads, state.opt_state, state.params)
  expected_params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  assert int(new_state.step) == 1 and int(metrics['schedule_count']) == 0
  np.testing.assert_allclose(metrics['loss'], np.mean([loss for loss, _ in per_micro]), rtol=1e-6)
  np.testing.assert_allclose(metrics['grad_norm'], optax_global_norm(mean_grads), rtol=1e-5)
  # Adam's first update is about lr x sign(g): a gradient near 0 amplifies float32 rounding (up to 1e-6 here, in
  # updates of up to lr = 1e-2).
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Not the update on either micro-batch alone (what logging only the last micro-batch would describe).
  assert not np.isclose(float(metrics['grad_norm']), float(optax_global_norm(per_micro[1][1])), rtol=1e-3)


def optax_global_norm(tree):
  return np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize('bad_micro_batch', [0, 1])
def test_accumulated_float16_step_moves_the_loss_scale_once(bad_micro_batch):
  _, _, state, step, batch = accumulation_setup('float16', param_dtype='float16' if bad_micro_batch else 'float32')
  finite_state, _ = step(state, batch)  # a scale float16 gradients fit: grows toward its interval once, not twice
  assert int(finite_state.loss_scale.fin_steps) == 1 and float(finite_state.loss_scale.scale) == 2.0 ** 15
  assert int(finite_state.skipped_steps) == 0 and int(finite_state.step) == 1
  # One micro-batch whose loss is not finite (an infinite weight): the whole update is skipped and the scale backs
  # off once, whichever micro-batch it was.
  weights = np.array(batch['weights'])
  weights[bad_micro_batch, 0, 0] = np.inf
  skipped_state, metrics = step(state, {**batch, 'weights': jnp.asarray(weights)})
  assert float(skipped_state.loss_scale.scale) == 2.0 ** 14 and int(skipped_state.loss_scale.fin_steps) == 0
  assert not bool(metrics['grads_finite']) and int(skipped_state.forward_overflows) == 1
  assert int(skipped_state.skipped_steps) == 1 and int(skipped_state.step) == 1
  for got, want in zip(jax.tree.leaves(skipped_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(got, want)


def test_accumulated_gradients_keep_the_dtype_of_one_batchs_gradients_in_pure_float16():
  # flax unscales float16 gradients into float32; a float16 mean would flush the small ones the loss scale protects.
  model, _, state, _, batch = accumulation_setup('float16', param_dtype='float16')
  one = jax.eval_shape(lambda: train_step_lib.batch_gradients(
      state.params, {k: v[0] for k, v in batch.items()}, model, state.loss_scale, False)[-1])
  accumulated = jax.eval_shape(lambda: train_step_lib.accumulated_gradients(
      state.params, batch, model, state.loss_scale, False)[-1])
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {np.dtype('float16')}
  assert [leaf.dtype for leaf in jax.tree.leaves(accumulated)] == [leaf.dtype for leaf in jax.tree.leaves(one)]


@pytest.mark.slow  # a training run
def test_training_with_accumulation_counts_and_logs_optimizer_steps(corpus_data_dir, tmp_path):
  config = small_config(corpus_data_dir, steps=3)
  config.optimizer.grad_accum_steps = 2
  config.train.batch_size = 16  # micro-batches of 8 over the 8 devices
  final = train_lib.train(config, str(tmp_path))
  assert int(final.step) == 3
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]


@pytest.fixture(scope='module')
def logged_lines(corpus_data_dir, tmp_path_factory):
  """{log_every: metrics lines} of one float16 run logged every step and every 4 steps. Its initial loss scale (2^20)
  overflows float16 gradients, so the first steps are skipped while the scale halves."""
  lines = {}
  for log_every in (1, 4):
    config = small_config(corpus_data_dir, steps=12)
    config.model.compute_dtype = 'float16'
    config.train.update(initial_loss_scale=2.0 ** 20, log_every=log_every, stats_every=1000)  # statistics: step 12 only
    config.optimizer.update(lr=1.0, warmup_steps=100)  # all 12 steps in the warmup: lr = count / 100
    config.mesh.update(data=1, fsdp=1, tensor=1)
    workdir = str(tmp_path_factory.mktemp(f'log_every_{log_every}'))
    train_lib.train(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      lines[log_every] = [json.loads(line) for line in f]
  return lines


@pytest.mark.slow  # two trainings (the shared fixture)
def test_logged_lr_is_the_lr_applied_and_skipped_steps_do_not_advance_it(logged_lines):
  lines = logged_lines[1]
  assert [line['step'] for line in lines] == list(range(1, 13))
  # Back-offs while the scale searches down and skips after it settles are both updates not applied.
  skipped_before = [0] + [line['skipped_steps'] + line['initial_scale_backoffs'] for line in lines[:-1]]
  assert skipped_before[-1] > 0  # the test needs skipped steps
  # A step's update is the (applied updates before it)-th of the schedule: warmup lr = count / 100.
  expected = [(line['step'] - 1 - skipped) / 100 for line, skipped in zip(lines, skipped_before)]
  np.testing.assert_allclose([line['lr'] for line in lines], expected, rtol=1e-6, atol=1e-9)
  assert lines[-1]['lr'] != pytest.approx(11 / 100)  # what schedule(step - 1) would say


@pytest.mark.slow  # two trainings (the shared fixture)
def test_logged_loss_and_grad_norm_are_window_means(logged_lines):
  per_step, windows = logged_lines[1], logged_lines[4]
  assert [line['step'] for line in windows] == [1, 4, 8, 12]  # step 1 always: the snapshot at init
  assert not np.isfinite(per_step[0]['grad_norm'])  # the first window holds skipped steps
  for previous, line in zip(windows, windows[1:]):
    steps = per_step[previous['step']:line['step']]
    for key in ('loss', 'grad_norm'):
      values = np.array([s[key] for s in steps], np.float64)
      np.testing.assert_allclose(line[key], values[np.isfinite(values)].mean(), rtol=1e-6)
    norms = np.array([s['grad_norm'] for s in steps], np.float64)
    assert line['grad_norm_max'] == pytest.approx(norms[np.isfinite(norms)].max(), rel=1e-6)
    layers = np.array([s['layer_grad_norm'] for s in steps], np.float64)
    finite = np.isfinite(layers)
    np.testing.assert_allclose(line['layer_grad_norm'], np.where(finite, layers, 0).sum(0) / finite.sum(0), rtol=1e-6)
  assert windows[1]['loss'] != pytest.approx(per_step[7]['loss'], rel=1e-9)  # a mean, not the step's own sample
