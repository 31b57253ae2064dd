"""The report's text tables of per-layer statistics (layers, the norms' γ, increments, massive activations) and the
number and column formatting every perijax table shares."""

import itertools
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from perijax import stats as stats_lib
from perijax.runs import RunRecord, chosen_stats

LAYER_QUANTITIES = (('residual_var', 'residual variance'), ('max_abs', 'max |x|'),
                    ('fp16_headroom', 'float16 headroom (max |x| / 65504)'))
SCALE_KINDS = (('in_norm', 'input norms'), ('out_norm', 'output norms'), ('qk_norm', 'QK norms'),
               ('final_norm', 'final norm'), ('embed_norm', 'embedding norm'))
INCREMENT_COLUMNS = (('increment_var', 'ΔVar'), ('delta_var', 'Var(Δ)'), ('cross_cov', '2Cov'))
_MAX_TABLE_WIDTH = 120


def format_number(value: Any) -> str:
  """Fixed-point for ordinary magnitudes, scientific otherwise, so columns stay narrow and comparable."""
  if value is None:
    return '-'
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  value = float(value)
  if value == 0 or not math.isfinite(value):
    return '0' if value == 0 else f'{value:g}'   # nan, inf, -inf
  return f'{value:.4g}' if 1e-2 <= abs(value) < 1e4 else f'{value:.2e}'


def format_table(headers: Sequence[Sequence[str]], rows: Sequence[Sequence[str]], keep: int = 1,
                 unit: int = 1) -> str:
  """Right-aligned fixed-width columns; header rows then body rows. A table wider than a terminal is cut into blocks
  of whole `unit`-column groups (e.g. one run's steps), each block repeating the first `keep` columns."""
  all_rows = [list(map(str, r)) for r in list(headers) + list(rows)]
  widths = [max(len(r[i]) for r in all_rows) for i in range(len(all_rows[0]))]
  blocks = [list(range(keep))]
  for start in range(keep, len(widths), unit):
    columns = list(range(start, min(start + unit, len(widths))))
    if len(blocks[-1]) > keep and sum(widths[i] + 2 for i in blocks[-1] + columns) > _MAX_TABLE_WIDTH:
      blocks.append(list(range(keep)))
    blocks[-1] += columns
  text = []
  for block in blocks:
    for n, row in enumerate(all_rows):
      text.append('  '.join(row[i].rjust(widths[i]) if i >= keep else row[i].ljust(widths[i]) for i in block))
      if n == len(headers) - 1:
        text.append('-' * len(text[-1]))
    text.append('')
  return '\n'.join(text).rstrip('\n')


def _short_labels(runs: Sequence[RunRecord]) -> Tuple[List[str], List[str]]:
  """Column labels: the run names if short, else #1, #2, ... with a legend (a list of lines, maybe empty)."""
  if all(len(r.name) <= 16 for r in runs):
    return [r.name for r in runs], []
  return [f'#{i}' for i in range(1, len(runs) + 1)], ['\n'.join(f'  #{i} = {r.name}' for i, r in enumerate(runs, 1))]


def _at(values: Optional[Sequence[Any]], layer: int) -> Any:
  """values[layer], or None where the line lacks it (a shallower run, an older log)."""
  return values[layer] if values and layer < len(values) else None


def layer_tables(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """Per quantity, a table of layers (rows) by run and step (columns)."""
  labels, text = _short_labels(runs)
  chosen = [chosen_stats(run, steps) for run in runs]
  num_layers = max([len(line['residual_var']) for lines in chosen for line in lines if line] or [0])
  if not num_layers:
    return 'no per-layer stats in these runs (metrics lines every train.stats_every steps, or eval `layers`)'
  header_runs = ['layer'] + [label if i == 0 else '' for label, lines in zip(labels, chosen) for i in range(len(lines))]
  header_steps = [''] + [f'step {line["step"]}' if line else 'no stats' for lines in chosen for line in lines]
  for key, title in LAYER_QUANTITIES:
    rows = [[str(layer + 1)] + [format_number(_at((line or {}).get(key), layer)) for lines in chosen for line in lines]
            for layer in range(num_layers)]
    text += [f'\n{title}', format_table([header_runs, header_steps], rows, unit=max(len(chosen[0]), 1))]
  return '\n'.join(text)


def scale_tables(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """Per run, the norms' γ (perijax.stats.scale_summary) at the last chosen step: layers (rows) by kind of norm,
  each cell mean [min, max]; the final and embedding norms in rows of their own."""
  text = []
  for run in runs:
    line = chosen_stats(run, steps)[-1] or {}
    if not any(key.endswith('_scale_mean') for key in line) and run.evals:  # evaluation alone logged them
      evaluated = run.evals.get(line.get('step')) or run.evals[max(run.evals)]
      line = {'step': evaluated['step'], **evaluated.get('norm_scales', {})}

    def cell(kind, layer=None):
      values = [line[f'{kind}_scale_{name}'] for name in ('mean', 'min', 'max')]
      values = values if layer is None else [value[layer] for value in values]
      return '-' if values[0] is None else '{} [{}, {}]'.format(*map(format_number, values))

    per_layer = [(kind, title) for kind, title in SCALE_KINDS if isinstance(line.get(f'{kind}_scale_mean'), list)]
    whole = [(kind, title) for kind, title in SCALE_KINDS if isinstance(line.get(f'{kind}_scale_mean'), float)]
    if per_layer or whole:
      depth = len(line[f'{per_layer[0][0]}_scale_mean']) if per_layer else 0
      rows = [[str(layer + 1)] + [cell(kind, layer) for kind, _ in per_layer] for layer in range(depth)]
      rows += [[title, cell(kind)] + [''] * (len(per_layer) - 1) for kind, title in whole]
      headers = ['layer'] + ([title for _, title in per_layer] or ['γ'])
      text += [f'\n{run.name} (step {line["step"]})', format_table([headers], rows)]
  return '\n'.join(text)


def increment_table(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """What drives the growth: per sub-layer, Var(x + Δ) - Var(x) = Var(Δ) + 2·Cov(x, Δ) (perijax/stats.py), layers
  (rows) by run, step and term (columns)."""
  labels, legend = _short_labels(runs)
  chosen = [[line for line in chosen_stats(run, steps) if line and line.get('attn_increment_var')] for run in runs]
  num_layers = max([len(line['attn_increment_var']) for lines in chosen for line in lines] or [0])
  if not num_layers:
    return 'no increment statistics in these runs (recorded since per-sub-layer increments were added)'
  terms = [(f'{sublayer}_{key}', f'{sublayer} {title}')
           for sublayer in ('attn', 'mlp') for key, title in INCREMENT_COLUMNS]
  blank = [''] * (len(terms) - 1)
  headers = [['layer'], [''], ['']]
  for label, lines in zip(labels, chosen):
    for line in lines:
      headers[0] += [label] + blank
      headers[1] += [f'step {line["step"]}'] + blank
      headers[2] += [title for _, title in terms]

  def cell(line, key, layer):
    value = _at(line.get(key), layer)
    return format_number(2 * value if key.endswith('cross_cov') and value is not None else value)

  rows = [[str(layer + 1)] + [cell(line, key, layer) for lines in chosen for line in lines for key, _ in terms]
          for layer in range(num_layers)]
  return '\n'.join(legend + [format_table(headers, rows, unit=len(terms))])


def token_texts(run: RunRecord):
  """id -> its text with the run's recorded tokenizer ('<doc>' for the document boundary), or None without one."""
  try:
    from perijax.data import tokenizers  # pylint: disable=g-import-not-at-top  (sentencepiece only when needed)
    tokenizer = tokenizers.load_tokenizer(run.workdir)
  except Exception:  # pylint: disable=broad-except  (no tokenizer recorded: ids only)
    return None
  return lambda token: tokenizer.decode([token]) if token != tokenizer.eos_id else '<doc>'


def _is_delimiter(text: Optional[str]) -> bool:
  """A document boundary, whitespace or punctuation (Sun et al. 2024 find massive activations there and at the first
  token)."""
  return text is not None and (text == '<doc>' or all(not c.isalnum() for c in text))


def massive_thresholds(run: RunRecord) -> Tuple[float, float]:
  train = run.config.get('train', {})
  return (train.get('massive_abs_threshold', stats_lib.MASSIVE_ABS_THRESHOLD),
          train.get('massive_ratio_threshold', stats_lib.MASSIVE_RATIO_THRESHOLD))


def massive_line(run: RunRecord, steps: Optional[Sequence[int]] = None) -> Optional[Dict[str, Any]]:
  """The last chosen stats line of `run` that has massive-activation statistics."""
  lines = [line for line in chosen_stats(run, steps) if line and line.get('massive_residual')]
  return lines[-1] if lines else None


def massive_summary(run: RunRecord, steps: Optional[Sequence[int]] = None) -> Optional[Dict[str, Any]]:
  """Where a run's massive activations sit at its last chosen step: per tensor, the layers (1-based) with any, and
  for the residual stream the channels (most frequent first) and the share at the first token and at delimiters."""
  line = massive_line(run, steps)
  if line is None:
    return None
  abs_threshold, ratio_threshold = massive_thresholds(run)
  texts = token_texts(run)
  summary = {'step': line['step'], 'abs_threshold': abs_threshold, 'ratio_threshold': ratio_threshold}
  for name, _, _ in stats_lib.MASSIVE_TENSORS:
    counts = stats_lib.massive_flags(line.get(f'massive_{name}') or [], abs_threshold, ratio_threshold)
    summary[f'{name}_layers'] = [layer + 1 for layer, count in enumerate(counts) if count]
  places = [(entry['position'][i], entry['channel'][i], entry['token'][i]) for entry in line['massive_residual']
            for i, (v, r) in enumerate(zip(entry['abs'], entry['ratio'])) if v > abs_threshold and r > ratio_threshold]
  channels = [channel for _, channel, _ in places]
  ratios = [r for entry in line['massive_residual'] for r in entry['ratio'][:1]]
  return {**summary, 'channels': sorted(set(channels), key=lambda c: (-channels.count(c), c)),
          'massive_entries': len(places),
          'first_token_share': sum(p == 0 for p, _, _ in places) / len(places) if places else None,
          'delimiter_share': (sum(_is_delimiter(texts(t)) for _, _, t in places) / len(places)
                              if places and texts else None),
          'max_ratio': max(ratios) if ratios else None}


def massive_table(run: RunRecord, steps: Optional[Sequence[int]] = None) -> str:
  """Per layer of one run at its last chosen step: each tensor's largest |x|, its ratio to the median |x| and where it
  sits (position/channel and token); `*` marks a massive activation (the run's thresholds)."""
  line = massive_line(run, steps)
  if line is None:
    return f'{run.name}: no massive-activation statistics'
  abs_threshold, ratio_threshold = massive_thresholds(run)
  texts = token_texts(run)
  headers = ['layer'] + [title for name, _, _ in stats_lib.MASSIVE_TENSORS for title in (f'{name} |x|', 'ratio', 'at')]
  rows = []
  for layer in range(len(line['massive_residual'])):
    row = [str(layer + 1)]
    for name, _, _ in stats_lib.MASSIVE_TENSORS:
      entry = (line.get(f'massive_{name}') or [{}] * (layer + 1))[layer]
      if not entry.get('abs'):
        row += ['-'] * 3
        continue
      value, ratio, token = entry['abs'][0], entry['ratio'][0], entry['token'][0]
      text = str(token) if texts is None else ('<doc>' if texts(token) == '<doc>' else repr(texts(token)))
      row += [format_number(value) + ('*' if value > abs_threshold and ratio > ratio_threshold else ''),
              format_number(ratio), f'{entry["position"][0]}/{entry["channel"][0]} {text}']
    rows.append(row)
  return (f'{run.name}, step {line["step"]} (* = |x| > {abs_threshold:g} and > {ratio_threshold:g} x median |x|; '
          'at = position in the document/channel token)\n' + format_table([headers], rows))


def _layer_ranges(layers: Sequence[int]) -> str:
  """[1, 2, 3, 5] -> '1-3,5'; [] -> 'none'."""
  runs = [[layer for _, layer in run] for _, run in itertools.groupby(enumerate(layers), lambda p: p[1] - p[0])]
  return ','.join(f'{run[0]}-{run[-1]}' if len(run) > 1 else str(run[0]) for run in runs) or 'none'


def _share(value: Optional[float]) -> str:
  return '-' if value is None else f'{value:.0%}'


def massive_placements(runs: Sequence[RunRecord], steps: Optional[Sequence[int]] = None) -> str:
  """One row per run: the layers whose stream / sub-layer outputs hold massive activations, their channels, the share
  at the first token and at delimiters, and the largest ratio to the median |x|, so placements compare at a glance."""
  headers = ['run', 'placement', 'step', 'residual', 'attn_out', 'mlp_out', 'channels', 'first token', 'delimiters',
             'max ratio']
  rows = [[run.name, str(run.placement or '-'), str(summary['step'])]
          + [_layer_ranges(summary[f'{name}_layers']) for name, _, _ in stats_lib.MASSIVE_TENSORS]
          + [','.join(map(str, summary['channels'][:4])) or '-', _share(summary['first_token_share']),
             _share(summary['delimiter_share']), format_number(summary['max_ratio'])]
          for run, summary in ((run, massive_summary(run, steps)) for run in runs) if summary is not None]
  if not rows:
    return 'no massive-activation statistics in these runs'
  return ('Where massive activations sit (layers per tensor; channels, first token, delimiters: residual stream)\n'
          + format_table([headers], rows, keep=3))
