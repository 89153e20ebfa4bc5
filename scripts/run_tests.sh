#!/usr/bin/env bash
# Runs the whole test suite on CPU: kernels through Triton's interpreter, the arena on the
# host (mmap) backend. GPU tests are marked and skip without CUDA. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
# xdist: an out-of-bounds access under the interpreter kills a worker, not the whole run.
exec python -m pytest -n 2 "$@"
