"""CPU scale: trains in minutes on two cores on the embedded Shakespeare + Milton corpus (byte tokenizer)."""

from configs import default


def get_config():
  config = default.get_config()
  # CPU choices (benchmarks/RESULTS.md): the written-out attention differentiates fastest, and recomputing the
  # elementwise work in the backward pass (remat 'minimal') beats storing and reloading it on two memory-bound cores.
  # Unrolling the 4-layer scan lets XLA:CPU read the saved activations in place instead of copying each layer's out
  # of the stacked buffers, which Peri-LN's extra saved inputs paid for (benchmarks/RESULTS.md: `model.scan_unroll`).
  config.model.update(vocab_size=320, d_model=128, num_layers=4, num_heads=4, attention_impl='einsum',
                      remat='minimal', scan_unroll=4)
  # Init: N(0, 0.02²) everywhere, no depth scaling of output projections: the init experiments/RESULTS.md was
  # measured with.
  config.model.init.update(std=0.02, depth_scaled_outputs=False)
  config.train.update(steps=200, batch_size=16, seq_len=128, log_every=10, stats_every=50)
  config.optimizer.update(lr=3e-3, warmup_steps=20)
  config.checkpoint.every = 100
  return config
