#!/usr/bin/env bash
# Runs every experiment at small scale (configs/tiny.py + each script's SMALL overrides) and writes
# experiments/results/*.json and *.png, as recorded in experiments/RESULTS.md. ~45 minutes on a busy 2-core CPU.
# Arguments go to every script, e.g. `bash experiments/run_all.sh --config=configs/paper_400m.py --print`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m perijax.data.corpus   # a no-op once prepared
for experiment in variance_law fp16_stability grad_norms pre_post_vs_peri; do
  echo "== experiments.${experiment}"
  .venv/bin/python -m "experiments.${experiment}" "$@"
done
