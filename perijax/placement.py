"""Where the normalization layers go: the placement table of docs/paper.md, and nothing else.

`x` is the residual stream entering a sub-layer, `F` the sub-layer (attention or MLP), `N(name)` makes a fresh
learnable norm. Every other file is placement-agnostic: it asks this module what to do.
"""

PLACEMENTS = ('post', 'pre', 'peri', 'pre_post', 'output', 'mix', 'none')


def residual_sublayer(placement, x, F, N):
  """Applies one residual sub-layer. Returns (new residual stream, F's raw output before any output norm)."""
  if placement == 'post':      # x <- N(x + F(x))               original Transformer, BERT
    y = F(x)
    return N('norm')(x + y), y
  if placement == 'pre':       # x <- x + F(N(x))               GPT-2/3, Llama
    y = F(N('norm')(x))
    return x + y, y
  if placement == 'peri':      # x <- x + N_out(F(N_in(x)))     the paper's Eq. 3: output norm BEFORE the add
    y = F(N('in_norm')(x))
    return x + N('out_norm')(y), y
  if placement == 'pre_post':  # x <- N_out(x + F(N_in(x)))     the summary's drawing: output norm AFTER the add
    y = F(N('in_norm')(x))
    return N('out_norm')(x + y), y
  if placement == 'output':    # x <- x + N(F(x))               OLMo 2's reordered norm
    y = F(x)
    return x + N('out_norm')(y), y
  if placement == 'none':      # x <- x + F(x)                  control: final norm only
    y = F(x)
    return x + y, y
  raise ValueError(f'unknown placement {placement!r}; allowed: {PLACEMENTS}')


def layer_placements(norm_config, num_layers):
  """The placement of each layer. Only Mix-LN varies with depth: Post-LN first, Pre-LN after."""
  if norm_config.placement == 'mix':
    return ['post'] * norm_config.mix_post_layers + ['pre'] * (num_layers - norm_config.mix_post_layers)
  return [norm_config.placement] * num_layers


def norm_role(placement, name):
  """'in' for a norm of a sub-layer's input, 'out' for one of its output (before or after the add): `name` as
  `residual_sublayer` gives it to N. Post-LN's only norm is an output norm, Pre-LN's an input norm."""
  if name == 'norm':
    return 'out' if placement == 'post' else 'in'
  return {'in_norm': 'in', 'out_norm': 'out'}[name]


def has_output_norm(placement):
  return placement in ('post', 'peri', 'pre_post', 'output')


def needs_final_norm(last_layer_placement):
  """A final norm before the LM head, unless the last layer already ends in a norm of the residual stream."""
  return last_layer_placement not in ('post', 'pre_post')
