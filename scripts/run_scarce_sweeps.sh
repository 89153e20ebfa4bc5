#!/usr/bin/env bash
# Issue 9's scarce-memory benchmark on the three shared full traces: every policy at each
# trace's default KV budget and at 1/4 and 1/8 of its peak live KV, into
# bench/results/scarce/full/ (per-run folders, scarce.md, scarce.json, scarce*.png).
# Resumable: runs already stored with the same configuration and code are skipped (--force
# reruns them). Options go to bench.scarce_sweep (e.g. --jobs 1, --with-max-tokens, --force;
# kv-replay options after --). JOBS (default 2) sets --jobs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
start=$(date +%s)
status=0
python -m bench.scarce_sweep --trace azure_conv_2023 --trace mooncake_conv_first30min \
    --trace mooncake_synthetic --out bench/results/scarce/full --jobs "${JOBS:-2}" "$@" \
    || status=$?
echo "run_scarce_sweeps.sh: $(( $(date +%s) - start )) s wall (exit status $status)" >&2
exit "$status"
