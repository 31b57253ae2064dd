"""~1.5B non-embedding parameters (1.493B): 32 layers, d_model 2048, 16 heads of 128."""

from configs import paper_common


def get_config():
  return paper_common.get_config(d_model=2048, num_layers=32, num_heads=16, mlp_dim=4864)
