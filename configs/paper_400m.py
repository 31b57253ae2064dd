"""~400M non-embedding parameters (403.4M): 24 layers (one source's depth for this size), d_model 1152, 18 heads
of 64."""

from configs import paper_common


def get_config():
  return paper_common.get_config(d_model=1152, num_layers=24, num_heads=18, mlp_dim=3328)
