"""The variance-vs-depth fit on synthetic curves whose answer is known."""

import math

import numpy as np
import pytest

from perijax import growth


def test_exact_linear_curve_recovers_slope_and_prefers_linear():
  layers = np.arange(1, 13)
  fit = growth.fit_growth(0.5 + 0.25 * layers)
  assert fit.num_layers == 12
  assert fit.linear_slope == pytest.approx(0.25, rel=1e-9)
  assert fit.linear_intercept == pytest.approx(0.5, rel=1e-9)
  assert fit.linear_r2 == pytest.approx(1.0, abs=1e-12)
  assert fit.exp_r2 < 1.0 - 1e-4
  assert fit.better == 'linear'
  assert fit.growth_ratio == pytest.approx((0.5 + 0.25 * 12) / 0.75)


def test_exact_exponential_curve_recovers_rate_and_prefers_exponential():
  layers = np.arange(1, 13)
  fit = growth.fit_growth(0.02 * np.exp(0.7 * layers))
  assert fit.exp_rate == pytest.approx(0.7, rel=1e-9)
  assert fit.exp_scale == pytest.approx(0.02, rel=1e-9)
  assert fit.exp_r2 == pytest.approx(1.0, abs=1e-12)
  assert fit.linear_r2 < 0.9
  assert fit.better == 'exponential'


def test_noisy_curves_pick_the_generating_law():
  rng = np.random.default_rng(0)
  layers = np.arange(1, 25)
  noisy_linear = (1.0 + 0.3 * layers) * (1 + 0.05 * rng.standard_normal(layers.size))
  noisy_exp = 0.01 * np.exp(0.35 * layers) * (1 + 0.05 * rng.standard_normal(layers.size))
  linear_fit = growth.fit_growth(noisy_linear)
  exp_fit = growth.fit_growth(noisy_exp)
  assert linear_fit.better == 'linear'
  assert linear_fit.linear_slope == pytest.approx(0.3, rel=0.15)
  assert exp_fit.better == 'exponential'
  assert exp_fit.exp_rate == pytest.approx(0.35, rel=0.05)


def test_r2_is_in_the_variance_domain_and_matches_numpy_reference():
  variance = np.array([1.0, 2.5, 2.9, 4.2, 9.0])
  layers = np.arange(1, 6)
  fit = growth.fit_growth(variance)
  # Independent reference: closed-form least squares and the textbook R².
  design = np.stack([np.ones(5), layers], axis=1)
  (intercept, slope), *_ = np.linalg.lstsq(design, variance, rcond=None)
  (log_a, rate), *_ = np.linalg.lstsq(design, np.log(variance), rcond=None)
  ss_tot = np.sum((variance - variance.mean()) ** 2)
  ref_lin_r2 = 1 - np.sum((variance - intercept - slope * layers) ** 2) / ss_tot
  ref_exp_r2 = 1 - np.sum((variance - np.exp(log_a + rate * layers)) ** 2) / ss_tot
  assert fit.linear_slope == pytest.approx(slope)
  assert fit.linear_r2 == pytest.approx(ref_lin_r2)
  assert fit.exp_rate == pytest.approx(rate)
  assert fit.exp_r2 == pytest.approx(ref_exp_r2)


def test_constant_curve_is_a_linear_tie_with_zero_slope():
  fit = growth.fit_growth([2.0, 2.0, 2.0, 2.0])
  assert fit.linear_slope == pytest.approx(0.0, abs=1e-12)
  assert fit.linear_r2 == 1.0
  assert fit.exp_rate == pytest.approx(0.0, abs=1e-12)
  assert fit.better == 'linear'


def test_non_positive_variance_skips_only_the_exponential_fit():
  fit = growth.fit_growth([0.0, 1.0, 2.0, 3.0])
  assert math.isnan(fit.exp_rate) and math.isnan(fit.exp_r2)
  assert fit.linear_slope == pytest.approx(1.0)
  assert fit.better == 'linear'
  assert 'exponential fit skipped' in fit.note


def test_non_finite_or_too_short_curves_give_no_fit():
  assert growth.fit_growth([1.0, float('inf'), 3.0]).better is None
  assert growth.fit_growth([1.0, float('nan')]).better is None
  short = growth.fit_growth([1.0])
  assert short.better is None and 'at least 2 layers' in short.note
