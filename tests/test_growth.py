"""perijax.growth on synthetic curves whose law is known: verdicts over a grid of laws, noise levels and depths,
parameters against NumPy references, intervals, several seeds, bad input."""

import json
import math

import numpy as np
import pytest

from perijax import growth

# The generating curves: linear with a substantial intercept (the init profile of a Peri-LN stack), l², exponential.
CURVES = {
    'linear 1 + 0.1·l': ('linear', lambda l: 1 + 0.1 * l),
    'linear 1 + l': ('linear', lambda l: 1 + l),
    'power 0.5·l²': ('power', lambda l: 0.5 * l ** 2),
    **{f'exponential 0.1·e^({r}·l)': ('exponential', lambda l, r=r: 0.1 * np.exp(r * l))
       for r in (0.05, 0.1, 0.2, 0.5)},
}
DEPTHS = (8, 24, 48, 96)
NOISES = (0.05, 0.1, 0.2)   # relative sd of the multiplicative noise: value = law(l) * (1 + noise * N(0, 1))
DRAWS = 200
# Identifiable: the true law beats its nearest rival by an expected ΔAIC of at least 40, computed from the noise-free
# curve alone (below). Chosen from the margin, not from the results: ΔAIC fluctuates by about 2·sqrt(its mean)
# (a non-central chi-square), so at 40 the mean minus two such spreads (≈ 15) is still above growth.MARGIN = 10.
IDENTIFIABLE_DELTA_AIC = 40.0


def log_space_lstsq(x, log_y):
  """Reference: intercept, slope and RSS of log_y on x by numpy's least squares."""
  design = np.stack([np.ones_like(x), x], axis=1)
  coef, *_ = np.linalg.lstsq(design, log_y, rcond=None)
  return coef[0], coef[1], float(np.sum((log_y - design @ coef) ** 2))


def brute_force_line(layers, log_y, points=240001):
  """Reference for the linear law: every line a + b·l positive at the first and last layer is A·(1 + (ρ-1)·t); a
  dense grid over log ρ with the closed-form best log A, then the best a, b and RSS."""
  t = (layers - layers.min()) / np.ptp(layers)
  rho = np.exp(np.linspace(-12, 12, points))
  log_shape = np.log(1 + (rho[:, None] - 1) * t)
  log_scale = np.mean(log_y - log_shape, axis=1)
  rss = np.sum((log_y - log_shape - log_scale[:, None]) ** 2, axis=1)
  k = np.argmin(rss)
  slope = np.exp(log_scale[k]) * (rho[k] - 1) / np.ptp(layers)
  return np.exp(log_scale[k]) - slope * layers.min(), slope, rss[k]


def nearest_rival_misfit(law, curve, layers):
  """The RSS (of logs) of the best rival law on the noise-free curve."""
  log_y = np.log(curve(layers))
  misfit = {'power': lambda: log_space_lstsq(np.log(layers), log_y)[2],
            'exponential': lambda: log_space_lstsq(layers, log_y)[2],
            'linear': lambda: brute_force_line(layers, log_y, points=24001)[2]}
  return min(rss() for rival, rss in misfit.items() if rival != law)


def expected_delta_aic(misfit, num_layers, noise):
  """How far (in AIC) the true law should beat its nearest rival: the rival's misfit on top of the noise's own RSS,
  (n - 2)·noise², in n·log(RSS ratio)."""
  return num_layers * math.log1p(misfit / ((num_layers - 2) * noise ** 2))


@pytest.fixture(scope='module')
def grid():
  """Every (curve, noise, depth) cell: its true law, expected ΔAIC and the fitter's DRAWS verdicts."""
  rng = np.random.default_rng(0)
  cells = []
  for depth in DEPTHS:
    layers = np.arange(1.0, depth + 1)
    misfits = {name: nearest_rival_misfit(law, curve, layers) for name, (law, curve) in CURVES.items()}
    for noise in NOISES:
      for name, (law, curve) in CURVES.items():
        draws = curve(layers) * (1 + noise * rng.standard_normal((DRAWS, depth)))
        cells.append({'name': f'{name}, {depth} layers, noise {noise}', 'law': law,
                      'expected_delta_aic': expected_delta_aic(misfits[name], depth, noise),
                      'verdicts': growth.verdicts_of_curves(draws, layers)})
  return cells


def test_a_wrong_law_is_named_in_at_most_5_percent_of_draws_anywhere_on_the_grid(grid):
  for cell in grid:
    wrong = np.mean((cell['verdicts'] != cell['law']) & (cell['verdicts'] != 'inconclusive'))
    assert wrong <= 0.05, cell['name']


def test_the_right_law_is_named_in_95_percent_of_draws_where_identifiable(grid):
  identifiable = [cell for cell in grid if cell['expected_delta_aic'] >= IDENTIFIABLE_DELTA_AIC]
  assert len(identifiable) >= len(grid) // 2   # the split leaves most of the grid to test
  for cell in identifiable:
    assert np.mean(cell['verdicts'] == cell['law']) >= 0.95, cell['name']
  # Growth 1.5x under 20% noise cannot be told from a line: inconclusive is the right answer there.
  hopeless, = [c for c in grid if c['name'] == 'exponential 0.1·e^(0.05·l), 8 layers, noise 0.2']
  assert hopeless['expected_delta_aic'] < 1 and np.mean(hopeless['verdicts'] == 'inconclusive') >= 0.95


def test_noise_around_a_constant_is_never_called_exponential():
  rng = np.random.default_rng(1)
  for depth in DEPTHS:
    for noise in NOISES:
      verdicts = growth.verdicts_of_curves(3.0 * (1 + noise * rng.standard_normal((DRAWS, depth))))
      assert not np.any(verdicts == 'exponential'), (depth, noise)
      assert np.mean(verdicts == 'inconclusive') >= 0.95, (depth, noise)


@pytest.mark.parametrize('law, curve, params', [
    ('linear', lambda l: 2.0 + 0.25 * l, {'a': 2.0, 'b': 0.25}),
    ('linear', lambda l: -1.0 + 0.5 * l, {'a': -1.0, 'b': 0.5}),   # a < 0 is fine while a + b·l > 0 at every layer
    ('power', lambda l: 3.0 * l ** 2, {'a': 3.0, 'p': 2.0}),
    ('exponential', lambda l: 0.02 * np.exp(0.7 * l), {'a': 0.02, 'r': 0.7}),
])
def test_exact_curves_recover_their_law_and_parameters(law, curve, params):
  fit = growth.fit_growth(curve(np.arange(3.0, 15)), layers=np.arange(3, 15))
  assert fit.verdict == law and fit.contenders == (law,)
  assert fit.laws[law].params == pytest.approx(params, rel=1e-6)
  assert fit.laws[law].delta_aic == 0
  assert min(f.delta_aic for other, f in fit.laws.items() if other != law) > 100


def test_growth_ratio_is_the_last_layer_over_the_first_in_any_order():
  values = [1.0, 2.0, 4.0]
  assert growth.fit_growth(values, layers=[1, 2, 3], bootstrap=0).growth_ratio == pytest.approx(4.0)
  assert growth.fit_growth(values, layers=[3, 2, 1], bootstrap=0).growth_ratio == pytest.approx(0.25)
  assert growth.fit_growth([2.0, 1.0, 4.0], layers=[2, 1, 3], bootstrap=0).growth_ratio == pytest.approx(4.0)


def test_fits_and_aic_match_numpy_references():
  rng = np.random.default_rng(2)
  layers = np.arange(1.0, 17)
  values = (0.5 + 0.3 * layers) * np.exp(0.3 * rng.standard_normal(16))
  log_y = np.log(values)
  fit = growth.fit_growth(values, bootstrap=0)
  log_a, p, rss_power = log_space_lstsq(np.log(layers), log_y)
  log_b, r, rss_exp = log_space_lstsq(layers, log_y)
  a, b, rss_linear = brute_force_line(layers, log_y)
  assert fit.laws['power'].params == pytest.approx({'a': math.exp(log_a), 'p': p})
  assert fit.laws['exponential'].params == pytest.approx({'a': math.exp(log_b), 'r': r})
  assert fit.laws['linear'].params == pytest.approx({'a': a, 'b': b}, rel=1e-3)
  rss = {'linear': rss_linear, 'power': rss_power, 'exponential': rss_exp}
  for law in growth.LAWS:   # same parameter count, so AIC = n·log(RSS/n) + const
    assert fit.laws[law].aic - fit.laws['power'].aic == pytest.approx(16 * math.log(rss[law] / rss_power), abs=1e-6)


def test_the_linear_fit_stays_positive_at_every_layer():
  # Falling to nearly zero at the last layer: an unconstrained line in log space would cross zero.
  values = np.array([8.0, 6.0, 4.0, 2.5, 1.0, 0.01])
  fit = growth.fit_growth(values, bootstrap=0)
  line = fit.laws['linear'].params
  assert np.all(line['a'] + line['b'] * np.arange(1, 7) > 0)
  assert brute_force_line(np.arange(1.0, 7), np.log(values))[1] == pytest.approx(line['b'], rel=1e-3)


def test_fit_growth_gives_the_batched_verdict_and_honours_layers():
  rng = np.random.default_rng(3)
  layers = np.arange(2.0, 50, 2)
  curves = 0.1 * np.exp(0.1 * layers) * (1 + 0.2 * rng.standard_normal((20, layers.size)))
  batched = growth.verdicts_of_curves(curves, layers)
  assert [growth.fit_growth(c, layers, bootstrap=0).verdict for c in curves] == batched.tolist()
  assert growth.fit_growth(curves[0], layers).laws['exponential'].params['r'] == pytest.approx(0.1, rel=0.15)


def test_intervals_cover_the_true_rate_in_most_draws_and_are_as_wide_as_least_squares_says():
  rng = np.random.default_rng(4)
  layers = np.arange(1.0, 25)
  noise, covered, widths = 0.1, 0, []
  for _ in range(100):
    fit = growth.fit_growth(0.1 * np.exp(0.2 * layers) * (1 + noise * rng.standard_normal(24)))
    low, high = fit.laws['exponential'].intervals['r']
    covered += low <= 0.2 <= high
    widths.append(high - low)
  assert covered >= 80   # nominal 95%; a bootstrap over 24 layers covers somewhat less (91 of these 100)
  textbook = 2 * 1.96 * noise / math.sqrt(np.sum((layers - layers.mean()) ** 2))
  assert 0.5 * textbook < np.median(widths) < 2 * textbook


def test_several_seeds_fit_the_geometric_mean_with_intervals_over_seeds():
  rng = np.random.default_rng(5)
  layers = np.arange(1.0, 33)
  # Each seed has its own level (a seed-wide factor) and per-layer noise.
  seeds = (1 + 0.5 * layers) * np.exp(0.2 * rng.standard_normal((6, 1))) * (1 + 0.1 * rng.standard_normal((6, 32)))
  fit = growth.fit_growth(seeds)
  assert (fit.num_seeds, fit.num_layers, fit.verdict) == (6, 32, 'linear')
  geometric_mean = growth.fit_growth(np.exp(np.log(seeds).mean(0)), bootstrap=0)
  for law in growth.LAWS:
    assert fit.laws[law].params == pytest.approx(geometric_mean.laws[law].params)
    assert fit.laws[law].aic == pytest.approx(geometric_mean.laws[law].aic)
  low, high = fit.laws['linear'].intervals['a']
  assert low < fit.laws['linear'].params['a'] < high
  # The seed-wide factors move every layer together: resampling seeds sees them, resampling layers does not.
  per_layer = growth.fit_growth(np.exp(np.log(seeds).mean(0)))
  assert np.ptp(fit.laws['linear'].intervals['a']) > 2 * np.ptp(per_layer.laws['linear'].intervals['a'])
  assert growth.fit_growth(seeds[:1]).to_dict() == growth.fit_growth(seeds[0]).to_dict()


@pytest.mark.parametrize('values, message', [
    ([1.0, float('inf'), 3.0, 4.0], 'non-finite'),
    ([[1.0, 2.0, 3.0], [1.0, float('nan'), 3.0]], 'non-finite'),
    ([0.0, 1.0, 2.0, 3.0], '<= 0'),
    ([1.0, -2.0, 3.0], '<= 0'),
    ([1.0, 2.0], 'at least 3 layers'),
    ([], 'at least 3 layers'),
    (np.ones((2, 2, 3)), 'shape [layers] or [seeds, layers]'),
])
def test_bad_values_give_no_fit_and_say_why(values, message):
  fit = growth.fit_growth(values)
  assert fit.verdict == 'inconclusive' and fit.laws == {} and message in fit.note
  json.dumps(fit.to_dict())   # still a valid record


def test_bad_layers_are_refused():
  with pytest.raises(ValueError, match='layers must be 4 finite positive numbers'):
    growth.fit_growth([1.0, 2.0, 3.0, 4.0], layers=[0, 1, 2, 3])
  with pytest.raises(ValueError, match='layers must be 4'):
    growth.fit_growth([1.0, 2.0, 3.0, 4.0], layers=[1, 2, 3])


def test_record_keeps_growth_ratio_and_every_law():
  record = growth.fit_growth(1.0 + 0.5 * np.arange(1, 9)).to_dict()
  assert record['growth_ratio'] == pytest.approx(5.0 / 1.5)
  assert set(record['laws']) == set(growth.LAWS)
  assert set(record['laws']['power']['intervals']) == {'a', 'p'}
  json.dumps(record)
