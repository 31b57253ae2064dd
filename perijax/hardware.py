"""Accelerators' peak dense bfloat16/float16 matmul rates (the vendors' non-sparse figures) and memory, for MFU and
the dry run; the CPU has no published peak, so perijax measures it."""

import math
import timeit

import jax
import jax.numpy as jnp

# XLA:CPU allocates each step's temporaries as one block of a few hundred MB, which glibc maps afresh and unmaps every
# step, the kernel zeroing every page again: 40-120 ms of system time per step, more for Peri-LN's larger block
# (benchmarks/RESULTS.md). These keep the block (one arena, no mmapped chunks, no trimming), at the price of a few
# blocks resident. glibc reads them at process start only: export GLIBC_TUNABLES=<this> (benchmarks/run.py re-executes
# itself with them, experiments/demo.sh exports them).
CPU_GLIBC_TUNABLES = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967296'

GIB, MIB = 2**30, 2**20
# name: (peak FLOP/s in bfloat16/float16, memory per device in bytes, HBM bandwidth bytes/s). Memory as the devices
# have it, not the decimal GB of their names: GiB for TPUs (Google's figures), nvidia-smi's MiB totals for GPUs (the
# 32 GB V100, 80 GB A100 and H100 SXM, 141 GB H200).
ACCELERATORS = {
    'tpu_v4': (275e12, 32 * GIB, 1.2e12),
    'tpu_v5e': (197e12, 16 * GIB, 0.82e12),
    'tpu_v5p': (459e12, 95 * GIB, 2.76e12),
    'tpu_v6e': (918e12, 32 * GIB, 1.64e12),
    'v100': (125e12, 32510 * MIB, 0.9e12),
    'a100': (312e12, 81920 * MIB, 2.0e12),
    'h100': (989e12, 81559 * MIB, 3.35e12),
    'h200': (989e12, 143771 * MIB, 4.8e12),
}


def measured_matmul_flops(size=1024, dtype=jnp.float32, repeats=5):
  """FLOP/s of this process's first device on a dense square matmul, the best of `repeats` (MFU's CPU denominator)."""
  matmul = jax.jit(lambda x: x @ x)
  a = jnp.ones((size, size), dtype)
  matmul(a).block_until_ready()  # compiles
  return 2 * size ** 3 / min(timeit.repeat(lambda: matmul(a).block_until_ready(), number=1, repeat=repeats))


def peak_flops(accelerator):
  """Peak FLOP/s of one device: the table, or for 'cpu' this machine's measured matmul rate."""
  if accelerator == 'cpu':
    return measured_matmul_flops()
  if accelerator not in ACCELERATORS:
    raise ValueError(f'unknown accelerator {accelerator!r}; known: cpu, {", ".join(ACCELERATORS)}')
  return ACCELERATORS[accelerator][0]


def peak_flops_for(accelerator, backend, device_count):
  """MFU's denominator: the peak of all `device_count` devices (table peaks are per device; the CPU rate is measured
  for the whole host), or NaN where `accelerator` is 'cpu' but `backend` (jax.default_backend()) is not: one CPU
  matmul rate is no peak of GPUs or TPUs."""
  if mfu_notice(accelerator, backend):
    return math.nan
  return measured_matmul_flops() if accelerator == 'cpu' else peak_flops(accelerator) * device_count


def mfu_notice(accelerator, backend):
  """The line saying why MFU is NaN (see peak_flops_for), or None where it is computed."""
  if accelerator != 'cpu' or backend == 'cpu':
    return None
  return (f"config.train.accelerator is 'cpu' but training runs on {backend}: MFU is not computed (logged as NaN); "
          f'set it to one of {", ".join(ACCELERATORS)}')
