"""Runtime set-up: the GPU XLA-flag preset (every flag known to this jaxlib, the user's own flags kept) and the
persistent compilation cache (a second start reads what the first wrote)."""

import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from perijax import runtime

REPO = pathlib.Path(__file__).resolve().parent.parent


def start_jax(xla_flags):
  """A fresh process starting the CPU backend under `xla_flags`: XLA aborts on a flag it does not know."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  return subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.zeros(2).block_until_ready()'], env=env,
                        capture_output=True, text=True, timeout=120)


def test_gpu_preset_flags_all_exist_in_this_jaxlib():
  assert start_jax(runtime.xla_flags('gpu')).returncode == 0
  assert start_jax('--xla_gpu_no_such_flag=true').returncode != 0  # the check can fail


def test_preset_adds_its_flags_and_keeps_the_users():
  user = '--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=true'
  flags = runtime.xla_flags('gpu', user).split()
  assert flags[:2] == user.split()  # the user's value of a preset flag wins
  assert '--xla_gpu_enable_triton_gemm=false' not in flags
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in flags
  assert len(flags) == 2 + len(runtime.XLA_FLAGS_PRESETS['gpu']) - 1
  assert runtime.xla_flags('none', user) == user


def test_setup_sets_xla_flags_only_for_a_preset(monkeypatch):
  train = ml_collections.ConfigDict(dict(xla_flags_preset='gpu', compilation_cache_dir=''))
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  runtime.setup(train)
  assert os.environ['XLA_FLAGS'] == runtime.xla_flags('gpu', '--xla_force_host_platform_device_count=8')
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  train.xla_flags_preset = 'none'
  runtime.setup(train)
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'


@pytest.mark.slow
def test_second_start_compiles_from_the_cache(tmp_path):
  # benchmarks/compile_cache.py: two fresh processes compile tiny's train step with one cache directory.
  out = tmp_path / 'compile_cache.json'
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')  # cache even a fast compile
  subprocess.run([sys.executable, 'benchmarks/compile_cache.py', '--config=configs/tiny.py', f'--out={out}'],
                 cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
  result = json.loads(out.read_text())
  assert result['cold_cache_hits'] == 0 and result['cached_cache_hits'] >= 1 and result['cache_files'] >= 1
