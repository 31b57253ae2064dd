"""Peak dense matmul rates and memory of accelerators, for MFU and the dry run's step-time estimate.

Peaks are the vendors' dense (non-sparse) bfloat16/float16 figures. The CPU has no published peak: perijax measures it.
"""

import time

import jax
import jax.numpy as jnp

# XLA:CPU allocates each step's temporaries as one block (380 MB for Peri-LN at d_model 512), from whichever thread
# runs the step. glibc serves a block that large from a thread with a fresh mmap, unmaps it when the step ends, and the
# kernel zeroes every page again next step: 40-120 ms of system time per step, more for a larger block (Peri-LN's) and
# whenever memory is fragmented, so Peri/Pre step time varied from 1.00 to 1.06 (benchmarks/RESULTS.md). These
# tunables keep the block: one arena (the main heap, which can grow to any size), no mmapped chunks, and no trimming of
# freed memory, so later steps reuse the same pages. The price is memory: steps overlap (the next is dispatched before
# the last frees its block), so the heap settles at a few blocks within ~10 steps (peri at d_model 512: 2.2 GB resident
# instead of 1.15 GB). glibc reads them only at process start: benchmarks/run.py re-executes itself with them,
# experiments/demo.sh exports them, and for your own CPU runs: export GLIBC_TUNABLES=<this>.
CPU_GLIBC_TUNABLES = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296'

# name: (peak FLOP/s in bfloat16/float16, memory per device in bytes, HBM bandwidth bytes/s)
ACCELERATORS = {
    'tpu_v4': (275e12, 32e9, 1.2e12),
    'tpu_v5e': (197e12, 16e9, 0.82e12),
    'tpu_v5p': (459e12, 95e9, 2.76e12),
    'tpu_v6e': (918e12, 32e9, 1.64e12),
    'v100': (125e12, 32e9, 0.9e12),
    'a100': (312e12, 80e9, 2.0e12),
    'h100': (989e12, 80e9, 3.35e12),
    'h200': (989e12, 141e9, 4.8e12),
}


def measured_matmul_flops(size=1024, dtype=jnp.float32, repeats=5):
  """FLOP/s of one device on a dense square matmul, the best of `repeats` runs (MFU's denominator on CPU)."""
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_flops(accelerator):
  """Peak FLOP/s of one device: the table, or for 'cpu' this machine's measured matmul rate."""
  if accelerator == 'cpu':
    return measured_matmul_flops()
  if accelerator not in ACCELERATORS:
    raise ValueError(f'unknown accelerator {accelerator!r}; known: cpu, {", ".join(ACCELERATORS)}')
  return ACCELERATORS[accelerator][0]
