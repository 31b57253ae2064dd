"""~3.2B non-embedding parameters (3.228B): 48 layers (one source's depth for this size), d_model 2304, 18 heads
of 128."""

from configs import paper_common


def get_config():
  return paper_common.get_config(d_model=2304, num_layers=48, num_heads=18, mlp_dim=6656)
