#!/usr/bin/env bash
# Runs the whole test suite on CPU: kernels through Triton's interpreter, the arena on the
# host (mmap) backend. GPU tests are marked and skip without CUDA. Extra args go to pytest.
# The ahead-of-time sm_90 compile check (tests/test_kernel_aot.py) runs under the pinned
# triton and under triton 3.6 (the GPU machine's) from .venv-triton36; set
# KVARENA_AOT_PYTHONS= (empty) to skip the second one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KVARENA_AOT_PYTHONS+set}" ]; then
  bash scripts/setup.sh --with-triton36
  export KVARENA_AOT_PYTHONS=$PWD/.venv-triton36/bin/python
else
  bash scripts/setup.sh
fi
. .venv/bin/activate
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
# xdist: an out-of-bounds access under the interpreter kills a worker, not the whole run.
exec python -m pytest -n 2 "$@"
