"""The growth law of residual variance with depth (PAPER.md claim 1): linear or exponential?

Peri-LN adds a normalized term per sub-layer, so `Var(x_l) ~ a + b*l` (linear in the layer index l = 1..L); Pre-LN adds
F's raw output, whose scale can compound, so its variance can look like `a * exp(r*l)`. `fit_growth` fits both and says
which describes a curve better.

How the fits are made and compared:
  - linear: ordinary least squares of the variance on l;
  - exponential: least squares of log(variance) on l (the usual log-linear fit; it weighs every layer's *relative*
    error equally, so one huge deep layer does not dominate), then mapped back as `a * exp(r*l)`;
  - both R² are computed in the variance domain, R² = 1 - SS_res / SS_tot with SS_tot around the mean variance, so the
    two numbers are comparable (an R² of the log fit in log space would not be). The exponential R² can be negative: its
    fit minimizes log-space error, not variance-space error.
  - a curve with SS_tot = 0 (constant variance) gets R² = 1 for a fit that reproduces it exactly, else 0;
  - `better` is the fit with the higher R²; a tie (within 1e-9) goes to 'linear', the simpler claim.
The exponential fit needs every variance > 0 and finite; otherwise it is skipped (rate and R² are NaN) and `better`
is decided by the linear fit alone ('linear' if it could be fitted at all).
"""

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

_TIE_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class GrowthFit:
  """Both fits of variance against layer index 1..num_layers, and which is better."""
  num_layers: int
  linear_intercept: float   # a in a + b*l
  linear_slope: float       # b: variance added per layer
  linear_r2: float
  exp_scale: float          # a in a * exp(r*l); NaN when the exponential fit was skipped
  exp_rate: float           # r: log-variance added per layer (exp(r) is the per-layer growth factor)
  exp_r2: float
  better: Optional[str]     # 'linear' | 'exponential' | None (nothing could be fitted)
  growth_ratio: float       # Var(x_L) / Var(x_1): how many times the variance grew from the first layer to the last
  note: str = ''            # why a fit was skipped, if one was

  def to_dict(self):
    return dataclasses.asdict(self)


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
  """1 - SS_res / SS_tot, with the constant-curve convention documented in the module docstring."""
  observed = np.asarray(observed, dtype=np.float64)
  predicted = np.asarray(predicted, dtype=np.float64)
  ss_res = float(np.sum((observed - predicted) ** 2))
  ss_tot = float(np.sum((observed - observed.mean()) ** 2))
  scale = max(float(np.sum(observed ** 2)), 1e-300)
  if ss_tot <= 1e-24 * scale:
    return 1.0 if ss_res <= 1e-18 * scale else 0.0
  return 1.0 - ss_res / ss_tot


def fit_growth(variance: Sequence[float]) -> GrowthFit:
  """Fits `variance[l-1]` (the residual variance after layer l) against l = 1..L, linearly and exponentially."""
  variance = np.asarray(variance, dtype=np.float64).reshape(-1)
  num_layers = int(variance.size)
  nan = float('nan')
  if num_layers < 2:
    return GrowthFit(num_layers, nan, nan, nan, nan, nan, nan, None, nan,
                     note=f'need at least 2 layers to fit, got {num_layers}')
  if not np.all(np.isfinite(variance)):
    return GrowthFit(num_layers, nan, nan, nan, nan, nan, nan, None, nan,
                     note='non-finite variance in some layer (overflow or divergence); no fit')

  layers = np.arange(1, num_layers + 1, dtype=np.float64)
  growth_ratio = float(variance[-1] / variance[0]) if variance[0] != 0 else nan

  slope, intercept = np.polyfit(layers, variance, 1)
  linear_r2 = r_squared(variance, intercept + slope * layers)

  note = ''
  if np.all(variance > 0):
    rate, log_scale = np.polyfit(layers, np.log(variance), 1)
    exp_scale = float(math.exp(log_scale))
    exp_r2 = r_squared(variance, exp_scale * np.exp(rate * layers))
    exp_rate = float(rate)
  else:
    exp_scale = exp_rate = exp_r2 = nan
    note = 'a variance <= 0: exponential fit skipped'

  if math.isnan(exp_r2) or linear_r2 >= exp_r2 - _TIE_TOLERANCE:
    better = 'linear'
  else:
    better = 'exponential'
  return GrowthFit(num_layers=num_layers, linear_intercept=float(intercept), linear_slope=float(slope),
                   linear_r2=float(linear_r2), exp_scale=exp_scale, exp_rate=exp_rate, exp_r2=float(exp_r2),
                   better=better, growth_ratio=growth_ratio, note=note)
