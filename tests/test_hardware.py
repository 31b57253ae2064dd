"""The CPU malloc tunables do what perijax/hardware.py says: a step's large temporary block is kept between steps."""

import math
import os
import platform
import subprocess
import sys

import pytest

from perijax import hardware

# One jitted call with a 64 MB temporary (the [4096, 4096] product); the median minor page faults of a call once warm
# (the first few calls may each fault a fresh block: XLA frees a call's temporaries a moment after its result is
# ready, so the heap grows to a few blocks before every call finds a freed one).
FAULTS_PER_CALL = """
import resource, statistics, jax, jax.numpy as jnp
f = jax.jit(lambda x: (x @ x.T) @ x)
x = jnp.ones((4096, 16))
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 64 * 2**20
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[10:]))
"""


def faults_per_call(glibc_tunables):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  if glibc_tunables:
    env['GLIBC_TUNABLES'] = glibc_tunables
  process = subprocess.run([sys.executable, '-c', FAULTS_PER_CALL], env=env, capture_output=True, text=True,
                           timeout=300, check=True)
  return float(process.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc tunables')
def test_cpu_malloc_tunables_keep_the_temporary_block():
  pages = 64 * 2**20 // os.sysconf('SC_PAGE_SIZE')
  # Without them glibc maps the block afresh every call and the kernel faults (and zeroes) every page of it again.
  assert faults_per_call(None) > pages / 2
  # Kept, it faults no page; mapped afresh in 2 MB huge pages it would still fault 32 per call.
  assert faults_per_call(hardware.CPU_GLIBC_TUNABLES) < 8


def test_mfu_peak_is_the_mesh_peak_or_nan_when_a_cpu_rate_would_be_compared_with_an_accelerator(monkeypatch):
  monkeypatch.setattr(hardware, 'measured_matmul_flops', lambda: 1e11)
  # Table peaks are per device; the CPU rate is measured for the whole host, whatever its device count.
  assert hardware.peak_flops_for('h100', 'gpu', 8) == 8 * 989e12
  assert hardware.peak_flops_for('tpu_v4', 'tpu', 4) == 4 * 275e12
  assert hardware.peak_flops_for('cpu', 'cpu', 8) == 1e11
  assert hardware.mfu_notice('cpu', 'cpu') is None and hardware.mfu_notice('h100', 'gpu') is None
  # One matmul rate of the host CPU is no peak of 8 GPUs: MFU is NaN, and the notice says what to set.
  assert math.isnan(hardware.peak_flops_for('cpu', 'gpu', 8))
  notice = hardware.mfu_notice('cpu', 'gpu')
  assert notice.startswith("config.train.accelerator is 'cpu' but training runs on gpu: MFU is not computed")
  assert all(name in notice for name in hardware.ACCELERATORS)


# Memory as the devices have it: Google's GiB for TPUs, nvidia-smi's "MiB" totals for GPUs (decimal GB would make the
# dry run's fits check ~7% too strict).
@pytest.mark.parametrize('name, memory_bytes', [
    ('tpu_v4', 32 * 2**30), ('tpu_v5e', 16 * 2**30), ('tpu_v5p', 95 * 2**30), ('tpu_v6e', 32 * 2**30),
    ('v100', 32510 * 2**20), ('a100', 81920 * 2**20), ('h100', 81559 * 2**20), ('h200', 143771 * 2**20)])
def test_accelerator_memory_is_in_the_units_the_device_reports(name, memory_bytes):
  assert hardware.ACCELERATORS[name][1] == memory_bytes
