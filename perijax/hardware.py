"""Peak dense matmul rates and memory of accelerators, for MFU and the dry run's step-time estimate.

Peaks are the vendors' dense (non-sparse) bfloat16/float16 figures. The CPU has no published peak: perijax measures it.
"""

import timeit

import jax
import jax.numpy as jnp

# XLA:CPU allocates each step's temporaries as one block (380 MB for Peri-LN at d_model 512). glibc serves a block that
# large with a fresh mmap and unmaps it when the step ends, so the kernel zeroes every page again next step: 40-120 ms
# of system time per step, more for a larger block (Peri-LN's) and fragmented memory, so Peri/Pre step time varied
# from 1.00 to 1.06 (benchmarks/RESULTS.md). These tunables keep the block: one arena, no mmapped chunks, no trimming.
# The price: steps overlap, so the heap settles at a few blocks (peri at d_model 512: 2.2 GB resident, not 1.15 GB).
# glibc reads them at process start only: benchmarks/run.py re-executes itself with them, experiments/demo.sh exports
# them, and for your own CPU runs: export GLIBC_TUNABLES=<this>.
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
  """FLOP/s of this process's first device on a dense square matmul, the best of `repeats` runs (MFU's denominator
  on CPU)."""
  matmul = jax.jit(lambda x: x @ x)
  a = jnp.ones((size, size), dtype)  # on the default device: this process's first
  matmul(a).block_until_ready()  # compiles
  return 2 * size ** 3 / min(timeit.repeat(lambda: matmul(a).block_until_ready(), number=1, repeat=repeats))


def peak_flops(accelerator):
  """Peak FLOP/s of one device: the table, or for 'cpu' this machine's measured matmul rate."""
  if accelerator == 'cpu':
    return measured_matmul_flops()
  if accelerator not in ACCELERATORS:
    raise ValueError(f'unknown accelerator {accelerator!r}; known: cpu, {", ".join(ACCELERATORS)}')
  return ACCELERATORS[accelerator][0]
