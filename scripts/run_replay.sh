#!/usr/bin/env bash
# Replays the embedded trace slice through the scheduler and arena under every memory policy
# and prints the comparison table. Extra args go to bench.replay (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m bench.replay "$@"
