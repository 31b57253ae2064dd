"""The growth law of a per-layer statistic with depth (docs/paper.md, claim 1; README.md says how to read the fit).

Linear `a + b·l` (Peri-LN adds a normalized term per sub-layer), exponential `a·e^(r·l)` (Pre-LN's raw sub-layer
outputs can compound) and power `a·l^p` are fitted by least squares of log(value): a batch statistic has roughly
multiplicative noise, and a raw-space loss would let the largest layers decide alone. With two parameters each,
AIC = n·log(RSS/n) + 6; the verdict is the law of lowest AIC when every other is at least MARGIN = 10 above it
(Burnham & Anderson 2002), else 'inconclusive'. Several seeds ([seeds, layers]) are fitted as the per-layer geometric
mean, n counting layers; 95% percentile-bootstrap intervals resample layers (one curve) or seeds (several) and cover
somewhat less with few of either (simulated: 83-97% at 8-48 layers, ~80% at 3-5 seeds).
"""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

LAWS = ('linear', 'power', 'exponential')
PARAMS = {'linear': ('a', 'b'), 'power': ('a', 'p'), 'exponential': ('a', 'r')}   # a + b·l, a·l^p, a·e^(r·l)
MARGIN = 10.0
BOOTSTRAP = 200
_LOG_RHO_GRID = np.linspace(-25.0, 25.0, 51)   # log(line at last layer / line at first layer)
_GOLDEN = (np.sqrt(5.0) - 1) / 2
_MSE_FLOOR = 1e-18   # two laws that both fit to rounding error tie instead of comparing rounding errors


@dataclasses.dataclass(frozen=True)
class LawFit:
  params: Dict[str, float]                     # e.g. {'a': ..., 'b': ...}, see PARAMS
  intervals: Dict[str, Tuple[float, float]]    # 95% bootstrap interval of each parameter
  aic: float
  delta_aic: float                             # aic minus the best law's aic


@dataclasses.dataclass(frozen=True)
class GrowthFit:
  num_layers: int
  num_seeds: int
  verdict: str                     # 'linear' | 'power' | 'exponential' | 'inconclusive'
  contenders: Tuple[str, ...]      # the laws within MARGIN of the best (one when the verdict is a law)
  laws: Dict[str, LawFit]          # empty when nothing could be fitted
  growth_ratio: float              # value at the last layer / value at the first (by layer index)
  note: str = ''

  def to_dict(self):
    return dataclasses.asdict(self)


def _regress(x, y):
  """Least squares y ≈ c + s·x along the last axis: (c, s, rss)."""
  x_mean, y_mean = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
  with np.errstate(all='ignore'):   # a bootstrap resample of a single layer has no slope
    slope = ((x - x_mean) * (y - y_mean)).sum(-1) / ((x - x_mean) ** 2).sum(-1)
  intercept = y_mean[..., 0] - slope * x_mean[..., 0]
  return intercept, slope, ((y - intercept[..., None] - slope[..., None] * x) ** 2).sum(-1)


def _line_rss(t, log_y, log_rho):
  """RSS of the best line of shape 1 + (ρ - 1)·t, its scale in closed form (log_rho broadcasts against t[..., 0])."""
  residual = log_y - np.log1p(np.expm1(log_rho)[..., None] * t)
  return ((residual - residual.mean(-1, keepdims=True)) ** 2).sum(-1)


def _fit_linear(layers, log_y, first, last):
  """A line positive at every layer is A·(1 + (ρ - 1)·t), t = 0 at the first layer and 1 at the last: for each ρ the
  best log A is the mean residual; log ρ is searched on a grid, then refined by golden section."""
  t = (layers - first) / (last - first)
  best = np.argmin(_line_rss(t[..., None, :], log_y[..., None, :], _LOG_RHO_GRID), -1)
  low = _LOG_RHO_GRID[np.maximum(best - 1, 0)]
  high = _LOG_RHO_GRID[np.minimum(best + 1, _LOG_RHO_GRID.size - 1)]
  for _ in range(50):   # golden section: the bracket of two grid steps shrinks to 1e-10
    left, right = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    go_left = _line_rss(t, log_y, left) < _line_rss(t, log_y, right)
    high, low = np.where(go_left, right, high), np.where(go_left, low, left)
  log_rho = (low + high) / 2
  scale = np.exp((log_y - np.log1p(np.expm1(log_rho)[..., None] * t)).mean(-1))
  slope = scale * np.expm1(log_rho) / (last - first)
  return scale - slope * first, slope, _line_rss(t, log_y, log_rho)


def fit_laws(layers, log_y, first: float, last: float) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Each law's (a, second parameter, RSS) for curves log_y [..., n] at layers [..., n] (batched over leading axes).
  `first`/`last` bound the layers where a + b·l must stay positive."""
  log_a_power, p, rss_power = _regress(np.log(layers), log_y)
  log_a_exp, r, rss_exp = _regress(layers, log_y)
  return {'linear': _fit_linear(layers, log_y, first, last), 'power': (np.exp(log_a_power), p, rss_power),
          'exponential': (np.exp(log_a_exp), r, rss_exp)}


def _aic(rss, n):
  return n * np.log(np.maximum(rss / n, _MSE_FLOOR)) + 6.0


def verdicts_of_curves(curves, layers: Optional[Sequence[float]] = None) -> np.ndarray:
  """fit_growth's verdict for each row of `curves` [curves, layers], an independent curve each; no intervals,
  vectorised (for simulations)."""
  curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
  layers = _check_layers(layers, curves.shape[-1])
  valid = np.all(np.isfinite(curves) & (curves > 0), axis=-1)
  log_y = np.log(np.where(valid[:, None], curves, 1.0))
  fits = fit_laws(np.broadcast_to(layers, log_y.shape), log_y, layers.min(), layers.max())
  aic = np.stack([_aic(fits[law][2], layers.size) for law in LAWS], -1)
  single = (aic - aic.min(-1, keepdims=True) < MARGIN).sum(-1) == 1
  return np.where(valid & single, np.array(LAWS)[np.argmin(aic, -1)], 'inconclusive')


def _check_layers(layers, num_layers):
  if layers is None:
    return np.arange(1, num_layers + 1, dtype=np.float64)
  layers = np.asarray(layers, dtype=np.float64).reshape(-1)
  if layers.size != num_layers or not np.all(np.isfinite(layers) & (layers > 0)) or np.ptp(layers) == 0:
    raise ValueError(f'layers must be {num_layers} finite positive numbers, not all equal; got {layers.tolist()}')
  return layers


def fit_growth(values, layers: Optional[Sequence[float]] = None, bootstrap: int = BOOTSTRAP,
               seed: int = 0) -> GrowthFit:
  """The three laws fitted to `values` [layers] or [seeds, layers] at `layers` (1..L by default), with intervals from
  `bootstrap` resamples. No fit, with a `note`, for non-finite or non-positive values or fewer than 3 layers."""
  given_shape = np.shape(values)
  values = np.asarray(values, dtype=np.float64)
  values = values[None] if values.ndim == 1 else values
  num_seeds, num_layers = values.shape if values.ndim == 2 else (0, 0)
  note = ''
  if values.ndim != 2 or num_layers < 3:
    note = f'need values of shape [layers] or [seeds, layers] with at least 3 layers, got {given_shape}'
  else:
    layers = _check_layers(layers, num_layers)   # a caller's wrong `layers` is an error even when the values are bad
    if not np.all(np.isfinite(values)):
      note = f'{np.sum(~np.isfinite(values))} non-finite value(s) (overflow or divergence); no fit'
    elif not np.all(values > 0):
      note = f'{np.sum(values <= 0)} value(s) <= 0: a growth law needs positive values; no fit'
  if note:
    return GrowthFit(num_layers, num_seeds, 'inconclusive', (), {}, float('nan'), note)
  log_values = np.log(values)
  log_y = log_values.mean(0)
  first, last = layers.min(), layers.max()
  fits = fit_laws(layers, log_y, first, last)
  rng = np.random.default_rng(seed)
  if num_seeds > 1:
    resampled_y = log_values[rng.integers(0, num_seeds, (bootstrap, num_seeds))].mean(1)
    resampled_layers = np.broadcast_to(layers, resampled_y.shape)
  else:
    index = np.sort(rng.integers(0, num_layers, (bootstrap, num_layers)), -1)
    index = index[(np.diff(index, axis=-1) > 0).sum(-1) >= 2]   # at least 3 distinct layers
    resampled_y, resampled_layers = log_y[index], layers[index]
  resampled = fit_laws(resampled_layers, resampled_y, first, last)
  aic = {law: float(_aic(fits[law][2], num_layers)) for law in LAWS}
  best = min(aic.values())
  contenders = tuple(sorted((law for law in LAWS if aic[law] - best < MARGIN), key=aic.get))
  laws = {}
  for law in LAWS:
    bounds = [np.nanpercentile(resampled[law][i], [2.5, 97.5]) if resampled[law][i].size else (np.nan, np.nan)
              for i in (0, 1)]
    laws[law] = LawFit({name: float(fits[law][i]) for i, name in enumerate(PARAMS[law])},
                       {name: (float(bounds[i][0]), float(bounds[i][1])) for i, name in enumerate(PARAMS[law])},
                       aic[law], aic[law] - best)
  verdict = contenders[0] if len(contenders) == 1 else 'inconclusive'
  note = '' if len(contenders) == 1 else f'{" and ".join(contenders)} within ΔAIC < {MARGIN:g} of each other'
  ratio = float(np.exp(log_y[np.argmax(layers)] - log_y[np.argmin(layers)]))   # `layers` may come in any order
  return GrowthFit(num_layers, num_seeds, verdict, contenders, laws, ratio, note)
