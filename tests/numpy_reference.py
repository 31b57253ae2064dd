"""An independent float64 NumPy implementation of the perijax Transformer, written from docs/paper.md's formulas.

It shares no code with perijax: it reads the parameter tree (non-scanned layout) and recomputes the forward pass; and
the dynamic loss scale after each step by the rule flax's DynamicScale documents.
"""

import numpy as np


def norm(x, p, kind, eps):
  if kind == 'layernorm':
    x = x - x.mean(-1, keepdims=True)
  y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p['scale']
  return y + p['bias'] if kind == 'layernorm' else y


def rope(x, theta=10000.0):  # x: [T, heads, dim]
  half = x.shape[-1] // 2
  angle = np.arange(x.shape[0])[:, None, None] * theta ** (-np.arange(half) / half)
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def attention(x, p):  # x: [T, d]
  q = np.einsum('td,dnh->tnh', x, p['query']['kernel'])
  k = np.einsum('td,dnh->tnh', x, p['key']['kernel'])
  v = np.einsum('td,dnh->tnh', x, p['value']['kernel'])
  q, k = rope(q), rope(k)
  logits = np.einsum('tnh,snh->nts', q, k) / np.sqrt(q.shape[-1])
  length = x.shape[0]
  logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('nts,snh->tnh', weights, v)
  return np.einsum('tnh,nhd->td', out, p['out']['kernel'])


def mlp(x, p):
  gate = x @ p['gate']['kernel']
  return (gate / (1 + np.exp(-gate)) * (x @ p['up']['kernel'])) @ p['down']['kernel']


# docs/paper.md's placement table, written out again: (x, F, N_in, N_out) -> new x.
FORMULAS = {
    'post': lambda x, F, n: n('norm')(x + F(x)),
    'pre': lambda x, F, n: x + F(n('norm')(x)),
    'peri': lambda x, F, n: x + n('out_norm')(F(n('in_norm')(x))),
    'pre_post': lambda x, F, n: n('out_norm')(x + F(n('in_norm')(x))),
    'output': lambda x, F, n: x + n('out_norm')(F(x)),
    'none': lambda x, F, n: x + F(x),
}


def forward(params, tokens, placements, kind, eps, final_norm, sublayers=None):
  """Logits [T, vocab] for one sequence; `placements` is the per-layer list. A `sublayers` list gets, per sub-layer in
  order, (stream entering it, stream leaving it, F's raw output)."""
  params = _to_float64(params)
  x = params['embed']['embedding'][tokens]
  for i, placement in enumerate(placements):
    p = params[f'layer_{i}']
    for sub, F in (('attention', lambda h: attention(h, p['attention'])), ('mlp', lambda h: mlp(h, p['mlp']))):
      outputs, before = [], x
      recorded = lambda h, F=F: outputs.append(F(h)) or outputs[-1]
      x = FORMULAS[placement](x, recorded, lambda name: (lambda h, name=name: norm(h, p[f'{sub}_{name}'], kind, eps)))
      if sublayers is not None:
        sublayers.append((before, x, outputs[0]))
  if final_norm:
    x = norm(x, params['final_norm'], kind, eps)
  return x @ params['embed']['embedding'].T


def _to_float64(tree):
  if isinstance(tree, dict):
    return {k: _to_float64(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def expected_loss_scales(initial, finite, growth_interval):
  """The dynamic loss scale after each step, as flax's DynamicScale documents it: halved by a step whose gradients
  overflowed; doubled by a finite step that follows growth_interval finite steps since the last change."""
  scales, scale, run = [], initial, 0
  for ok in finite:
    if not ok:
      scale, run = scale / 2, 0
    elif run == growth_interval:
      scale, run = scale * 2, 0
    else:
      run += 1
    scales.append(scale)
  return scales
