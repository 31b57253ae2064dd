#!/usr/bin/env bash
# Runs every experiment at small scale (configs/tiny.py + each script's SMALL overrides) and writes
# experiments/results/*.json and *.png, as recorded in experiments/RESULTS.md. About 3 hours on a 2-core CPU
# (lr_sensitivity ~90 min, variance_law ~30, fp16_stability ~30, grad_norms and pre_post_vs_peri ~10 each).
# Arguments go to every script, e.g. `bash experiments/run_all.sh --config=configs/paper_400m.py --print`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup-venv
.venv/bin/python -m perijax.data.corpus   # a no-op once prepared
for experiment in lr_sensitivity variance_law fp16_stability grad_norms pre_post_vs_peri; do
  echo "== experiments.${experiment}"
  .venv/bin/python -m "experiments.${experiment}" "$@"
done
