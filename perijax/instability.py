"""The divergence rule: when a training run has diverged, from its logged losses alone.

A run diverged at the first logged step where either
  * the loss is not finite (NaN or inf), or
  * a smoothed loss has stayed above its own running minimum by more than `margin` (nats) at every logged step
    for at least `patience_steps` steps: the run lost what it had learned and did not win it back.
The smoothing is an exponential moving average with decay `ema_decay` per optimizer step; losses logged every k
steps are weighted as k steps (decay^k), so the rule means the same whatever `train.log_every` is. The running
minimum is of the smoothed loss, so one lucky batch does not set the bar. A spike that recovers within
`patience_steps`, a plateau and a slowly falling loss are not divergence; a run that ends inside an excursion shorter
than `patience_steps` is not called diverged either. Parameters: `train.divergence_ema_decay`,
`train.divergence_margin`, `train.divergence_steps` (configs/default.py).

This replaces "final loss above the first", which depended on where a run happened to stop (a spike at the last
logged step made it diverged) and called a run that learned and then blew up back to just below its initial loss
healthy.
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
  """The rule of the module docstring on `losses` logged at `steps` (ascending; 1, 2, ... by default)."""
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
    weight = ema_decay ** (step - previous) if previous is not None else 0.0
    ema = loss if ema is None else weight * ema + (1 - weight) * loss
    previous = step
    if ema > lowest + margin:
      above_since = step if above_since is None else above_since
      if step - above_since >= patience_steps:
        return Divergence(True, above_since, 'smoothed loss above its minimum')
    else:
      above_since = None
    lowest = min(lowest, ema)
  return Divergence(False, None, '')


def rule_from_config(config: Any) -> dict:
  """{ema_decay, margin, patience_steps} from a config's `train` section (a ConfigDict, or config.json as a dict).
  A field the config lacks (a run recorded before it existed) takes `diverged`'s default, which is
  configs/default.py's value (tests/test_instability.py checks they agree)."""
  train = config.get('train', {}) if hasattr(config, 'get') else {}
  rule = {}
  for arg, field in FIELDS.items():
    value = train.get(field) if hasattr(train, 'get') else None
    rule[arg] = DEFAULTS[arg] if value is None else value
  return rule


def run_diverged(losses: Sequence[float], steps: Sequence[int], config: Any) -> Divergence:
  """`diverged` with the rule's parameters read from the run's config."""
  return diverged(losses, steps, **rule_from_config(config))
