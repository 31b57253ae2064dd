"""The divergence rule on synthetic loss curves of known answer, its config fields, and the float16 loss-scale
accounting (back-offs while the scale searches down, apart from skipped steps once settled) in a real run."""

import json
import math
import os

import numpy as np
import pytest

from configs import default
from configs import tiny
from perijax import config as config_lib
from perijax import instability
from perijax import report as report_lib
from perijax import runs as runs_lib
from perijax import train as train_lib
from tests import numpy_reference

STEPS = np.arange(1, 401)


def learning_curve(steps=STEPS, start=5.7, floor=2.0, rate=0.03, noise=0.05, seed=0):
  """A healthy run: exponential approach from `start` to `floor`, with per-batch noise."""
  rng = np.random.default_rng(seed)
  return floor + (start - floor) * np.exp(-rate * steps) + noise * rng.standard_normal(steps.size)


def test_a_healthy_curve_and_a_noisy_plateau_have_not_diverged():
  assert not instability.diverged(learning_curve(), STEPS).diverged
  plateau = 3.0 + 0.2 * np.random.default_rng(1).standard_normal(STEPS.size)
  result = instability.diverged(plateau, STEPS)
  assert result == instability.Divergence(False, None, '')


def test_a_spike_that_recovers_is_not_divergence_but_the_same_spike_held_is():
  losses = learning_curve()
  spiked = losses.copy()
  spiked[199:209] += 3.0    # steps 200-209: +3 nats, then back on the curve
  assert not instability.diverged(spiked, STEPS).diverged
  held = losses.copy()
  held[199:] += 3.0         # the spike never recovers
  result = instability.diverged(held, STEPS)
  assert result.diverged and result.reason == 'smoothed loss above its minimum'
  # The EMA (decay 0.9 per step) passes min + 0.5 within a few steps of the jump: ln(3 / 2.5) / -ln(0.9) ≈ 1.7.
  assert 200 <= result.step <= 203


def test_a_slow_rise_diverges_where_the_smoothed_loss_passes_the_margin():
  steps = STEPS
  losses = np.where(steps <= 200, 2.0 + 3.7 * np.exp(-0.05 * steps), 2.0 + 3.7 * np.exp(-10.0) + 0.01 * (steps - 200))
  result = instability.diverged(losses, steps, ema_decay=0.9, margin=0.5, patience_steps=50)
  # The raw loss is 0.5 above its minimum at step 250; the EMA lags a line of slope s by s·d/(1-d) = 0.09 (9 steps).
  assert result.diverged and 255 <= result.step <= 262
  # Shorter than the patience: the same rise stopped at step 280 (30 steps above the margin) is not divergence.
  assert not instability.diverged(losses[:280], steps[:280]).diverged


def test_a_non_finite_loss_diverges_at_its_step():
  for bad in (math.nan, math.inf):
    losses = learning_curve()
    losses[76] = bad
    assert instability.diverged(losses, STEPS) == instability.Divergence(True, 77, 'non-finite loss')


def test_a_blow_up_back_to_just_below_the_initial_loss_is_divergence():
  """The old rule (final loss above the first) called this healthy: 5.5 < 5.7."""
  losses = np.where(STEPS < 300, learning_curve(), 5.5)
  result = instability.diverged(losses, STEPS)
  assert result.diverged and 300 <= result.step <= 302
  assert not losses[-1] > losses[0]


def test_the_rule_means_the_same_whatever_the_logging_interval():
  losses = np.where(STEPS <= 200, learning_curve(noise=0.0), 2.0 + 0.01 * (STEPS - 200))
  every_step = instability.diverged(losses, STEPS)
  every_fifth = instability.diverged(losses[4::5], STEPS[4::5])
  assert every_step.diverged and every_fifth.diverged
  assert abs(every_step.step - every_fifth.step) <= 5


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='3 losses but 2 steps'):
    instability.diverged([1.0, 2.0, 3.0], [1, 2])
  with pytest.raises(ValueError, match='strictly increasing'):
    instability.diverged([1.0, 2.0], [5, 5])
  with pytest.raises(ValueError, match='ema_decay'):
    instability.diverged([1.0], [1], ema_decay=1.0)


def test_parameters_come_from_the_config_and_default_to_configs_default():
  train = default.get_config().train
  assert instability.DEFAULTS == {'ema_decay': train.divergence_ema_decay, 'margin': train.divergence_margin,
                                  'patience_steps': train.divergence_steps}
  config = default.get_config()
  config.train.update(divergence_ema_decay=0.5, divergence_margin=0.1, divergence_steps=7)
  assert instability.rule_from_config(config) == {'ema_decay': 0.5, 'margin': 0.1, 'patience_steps': 7}
  assert instability.rule_from_config({'train': {'divergence_margin': 2.0}}) == {**instability.DEFAULTS, 'margin': 2.0}
  assert instability.rule_from_config({}) == instability.DEFAULTS   # a run recorded before the fields existed
  # A margin of 0.1 nats catches a 0.3-nat step the default margin of 0.5 lets through.
  losses = np.where(STEPS < 300, learning_curve(noise=0.0), 2.3)
  assert not instability.run_diverged(losses, STEPS, {'train': {}}).diverged
  assert instability.run_diverged(losses, STEPS, config).diverged


@pytest.mark.parametrize('field,value,allowed', [('divergence_ema_decay', 1.0, r'\[0, 1\)'),
                                                 ('divergence_margin', 0.0, 'positive'),
                                                 ('divergence_steps', -3, 'positive')])
def test_bad_rule_fields_are_one_clear_error(field, value, allowed):
  config = default.get_config()
  config.train[field] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.train.{field} = .*{allowed}'):
    config_lib.validate(config)


def test_report_uses_the_rule(tmp_path):
  def record(losses, config=None):
    metrics = [{'step': 10 * (i + 1), 'loss': loss} for i, loss in enumerate(losses)]
    return runs_lib.RunRecord('r', str(tmp_path), config or {'train': {'steps': 10 * len(losses)}}, metrics, {})

  learned_then_lost = [5.7, 4.0, 3.0, 2.5, 2.2, 2.1] + [5.5] * 8   # final 5.5 < first 5.7
  summary = report_lib.summarize_run(record(learned_then_lost))
  assert summary['diverged'] and summary['diverged_at'] == 70
  assert not report_lib.summarize_run(record([5.7, 4.0, 3.0, 6.0, 3.0, 2.9, 2.8]))['diverged']  # one spike
  assert report_lib.summarize_run(record([5.0, math.inf, 4.0]))['diverged']


@pytest.mark.slow
def test_float16_backoffs_while_the_scale_searches_are_apart_from_settled_skips(corpus_data_dir, tmp_path):
  """A float16 run from a loss scale of 2^40: every step overflows until the scale has halved enough. Those are
  back-offs. Then the scale doubles every other finite step (growth interval 1) until scaled gradients overflow float16
  again: those overflows, after the scale settled, are skipped steps. metrics.jsonl logs both, the scale, and the
  per-layer gradient norms at step 1 (init) and later."""
  config = tiny.get_config()
  config.model.update(d_model=32, num_layers=2, num_heads=4, compute_dtype='float16', softmax_in_float32=False)
  config.train.update(steps=40, batch_size=8, seq_len=32, log_every=1, stats_every=1000, initial_loss_scale=2.0 ** 40,
                      loss_scale_growth_interval=1)
  config.optimizer.update(warmup_steps=2)
  config.data.data_dir = corpus_data_dir
  config.checkpoint.every = 0
  train_lib.train(config, str(tmp_path))
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  assert [line['step'] for line in lines] == list(range(1, 41))
  backoffs = lines[-1]['initial_scale_backoffs']
  assert 5 <= backoffs < 30                       # 2^40 x gradients overflow float16 for a while, then settle
  not_applied = [line['initial_scale_backoffs'] + line['skipped_steps'] for line in lines]
  finite = [now == before for before, now in zip([0] + not_applied, not_applied)]
  assert finite == [False] * backoffs + finite[backoffs:] and finite[backoffs]  # back-offs first, then settled
  assert [line['initial_scale_backoffs'] for line in lines] == [min(step, backoffs) for step in range(1, 41)]
  assert lines[-1]['skipped_steps'] == finite.count(False) - backoffs >= 1   # the regrown scale overflowed again
  assert [line['loss_scale'] for line in lines] == numpy_reference.expected_loss_scales(2.0 ** 40, finite, 1)
  assert all(len(line['layer_grad_norm']) == 2 for line in lines)
  # Step 1's gradients overflowed (the scale was still searching): its per-layer norms say so; a finite step's do not.
  assert not all(map(math.isfinite, lines[0]['layer_grad_norm']))
  last_finite = max(step for step in range(40) if finite[step])
  assert all(map(math.isfinite, lines[last_finite]['layer_grad_norm']))
  assert not report_lib.summarize_run(runs_lib.load_run(str(tmp_path)))['diverged']
