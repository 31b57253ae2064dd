"""Where the normalization layers go: the placement table of README.md, and nothing else.

`x` is the residual stream entering a sub-layer, `F` the sub-layer (attention or MLP), `N(name)` makes a fresh
learnable norm. Every other file is placement-agnostic: it asks this module what to do.
"""

PLACEMENTS = ('post', 'pre', 'peri', 'pre_post', 'output', 'mix', 'none')
# placement: (input norm, output norm, whether the output norm comes after the add). Mix-LN: see layer_placements.
NORMS = {
    'post': (None, 'norm', True),               # x <- N(x + F(x))              original Transformer, BERT
    'pre': ('norm', None, False),               # x <- x + F(N(x))              GPT-2/3, Llama
    'peri': ('in_norm', 'out_norm', False),     # x <- x + N_out(F(N_in(x)))    the paper's Eq. 3: norm BEFORE the add
    'pre_post': ('in_norm', 'out_norm', True),  # x <- N_out(x + F(N_in(x)))    the summary's drawing: AFTER the add
    'output': (None, 'out_norm', False),        # x <- x + N(F(x))              OLMo 2's reordered norm
    'none': (None, None, False),                # x <- x + F(x)                 control: final norm only
}


def residual_sublayer(placement, x, F, N):
  """Applies one residual sub-layer. Returns (new residual stream, F's raw output before any output norm)."""
  in_norm, out_norm, after_add = NORMS[placement]
  y = F(N(in_norm)(x) if in_norm else x)
  if out_norm is None:
    return x + y, y
  return (N(out_norm)(x + y) if after_add else x + N(out_norm)(y)), y


def layer_placements(norm_config, num_layers):
  """The placement of each layer. Only Mix-LN varies with depth: Post-LN first, Pre-LN after."""
  if norm_config.placement == 'mix':
    return ['post'] * norm_config.mix_post_layers + ['pre'] * (num_layers - norm_config.mix_post_layers)
  return [norm_config.placement] * num_layers


def norm_role(placement, name):
  """'in' or 'out': whether the norm `name` (as residual_sublayer gives it to N) normalizes F's input or output."""
  in_norm, out_norm, _ = NORMS[placement]
  return {in_norm: 'in', out_norm: 'out'}[name]   # an unknown name is a KeyError, never silently an output norm


def has_output_norm(placement):
  return NORMS[placement][1] is not None


def needs_final_norm(last_layer_placement):
  """A final norm before the LM head, unless the last layer already ends in a norm of the residual stream."""
  return not NORMS[last_layer_placement][2]
