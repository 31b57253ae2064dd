"""pyproject.toml and requirements.txt pin the same CPU set (the README's two commands install requirements.txt, the
per-platform lines install pyproject.toml); that every extra resolves is .ci/check-extras' job (it needs the index)."""

import pathlib
import re
import tomllib

REPO = pathlib.Path(__file__).resolve().parent.parent


def pins(lines):
  return {re.split('[=<>\\[]', line, 1)[0].lower(): line.strip() for line in lines
          if line.strip() and not line.lstrip().startswith('#')}


def test_pyproject_pins_are_requirements_txt():
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  extras = project['optional-dependencies']
  assert pins(project['dependencies'] + extras['dev']) == pins((REPO / 'requirements.txt').read_text().splitlines())
  assert all('==' in requirement for requirement in project['dependencies'] + sum(extras.values(), []))
  jax_version = pins(project['dependencies'])['jax'].split('==')[1]
  # The accelerator extras pull the jax[...] of the same version, so jax and jaxlib stay the tested pair.
  assert extras['tpu'] == [f'jax[tpu]=={jax_version}'] and extras['cuda12'] == [f'jax[cuda12]=={jax_version}']
