"""Peak dense matmul rates and memory of accelerators, for MFU and the dry run's step-time estimate.

Peaks are the vendors' dense (non-sparse) bfloat16/float16 figures. The CPU has no published peak: perijax measures it.
"""

import time

import jax
import jax.numpy as jnp

# glibc hands XLA:CPU's large per-step buffers back to the OS, and every step then page-faults them in again (80k
# faults and ~12% of the CPU time per step at d_model 512, measured): these tunables keep them, in huge pages. glibc
# reads them only at process start: benchmarks/run.py re-executes itself with them, experiments/demo.sh exports them,
# and for your own CPU runs: export GLIBC_TUNABLES=<this>.
CPU_GLIBC_TUNABLES = ('glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:'
                      'glibc.malloc.trim_threshold=4294967296')

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
