"""The divergence rule (README.md, "Metrics"): a run diverged at its first logged non-finite loss, or where an
exponential moving average of the loss (decay `ema_decay` per optimizer step, so the rule does not depend on
`train.log_every`) has stayed more than `margin` nats above its own running minimum for `patience_steps` steps. Unlike
"final loss above the first", it does not depend on where a run happened to stop: a spike that recovers, a plateau or
a run that ends mid-excursion is not divergence.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

# diverged()'s argument -> its field in config.train.
FIELDS = {'ema_decay': 'divergence_ema_decay', 'margin': 'divergence_margin', 'patience_steps': 'divergence_steps'}
DEFAULTS = {'ema_decay': 0.9, 'margin': 0.5, 'patience_steps': 50}   # as in configs/default.py


@dataclasses.dataclass(frozen=True)
class Divergence:
  diverged: bool
  step: Optional[int]       # onset: the non-finite step, or the first step of the excursion that did not end
  reason: str               # 'non-finite loss' | 'smoothed loss above its minimum' | ''


def diverged(losses: Sequence[float], steps: Optional[Sequence[int]] = None,
             ema_decay: float = DEFAULTS['ema_decay'], margin: float = DEFAULTS['margin'],
             patience_steps: int = DEFAULTS['patience_steps']) -> Divergence:
  """The rule on `losses` logged at `steps` (strictly increasing; 1, 2, ... by default); ValueError on bad input."""
  losses = np.asarray(losses, dtype=np.float64).reshape(-1)
  steps = np.arange(1, losses.size + 1) if steps is None else np.asarray(steps, dtype=np.int64).reshape(-1)
  if steps.size != losses.size:
    raise ValueError(f'{losses.size} losses but {steps.size} steps')
  if not 0 <= ema_decay < 1 or not margin > 0 or not patience_steps > 0:
    raise ValueError(f'need 0 <= ema_decay < 1, margin > 0, patience_steps > 0; got {ema_decay}, {margin}, '
                     f'{patience_steps}')
  if np.any(np.diff(steps) <= 0):
    raise ValueError(f'steps must be strictly increasing, got {steps.tolist()}')
  ema, lowest, above_since, previous = None, math.inf, None, None
  for step, loss in zip(steps.tolist(), losses.tolist()):
    if not math.isfinite(loss):
      return Divergence(True, step, 'non-finite loss')
    weight = 0.0 if previous is None else ema_decay ** (step - previous)
    ema = loss if ema is None else weight * ema + (1 - weight) * loss
    previous = step
    if ema <= lowest + margin:
      above_since = None
    elif above_since is None:
      above_since = step
    if above_since is not None and step - above_since >= patience_steps:
      return Divergence(True, above_since, 'smoothed loss above its minimum')
    lowest = min(lowest, ema)
  return Divergence(False, None, '')


def rule_from_config(config: Any) -> dict:
  """{ema_decay, margin, patience_steps} from a config's `train` section (a ConfigDict, or config.json as a dict);
  a field the config lacks (a run recorded before it existed) takes DEFAULTS'."""
  train = config.get('train', {}) if hasattr(config, 'get') else {}
  values = {arg: train.get(field) if hasattr(train, 'get') else None for arg, field in FIELDS.items()}
  return {arg: DEFAULTS[arg] if value is None else value for arg, value in values.items()}


def run_diverged(losses: Sequence[float], steps: Sequence[int], config: Any) -> Divergence:
  """`diverged` with the rule's parameters read from the run's config."""
  return diverged(losses, steps, **rule_from_config(config))
