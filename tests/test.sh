#!/usr/bin/env bash
# The test command of the README: sets up .venv, then runs the whole suite on 8 simulated CPU devices in pytest-xdist
# workers, all of a test file's tests on one worker (PERIJAX_TEST_WORKERS, default 2: each worker holds its own 8
# devices and compiled programs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
export XLA_FLAGS="--xla_force_host_platform_device_count=8" JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q -n "${PERIJAX_TEST_WORKERS:-2}" --dist loadfile tests "$@"
