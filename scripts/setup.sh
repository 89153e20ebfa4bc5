#!/usr/bin/env bash
# Creates .venv beside the repository (once) and installs the package with its test extras.
# The torch pin takes the CPU wheel on machines without a GPU; GPU machines keep what they have.
#
# --with-triton36: also create .venv-triton36, a second environment with the GPU machine's
# triton (3.6.0), used only by the ahead-of-time sm_90 compile check (tests/test_kernel_aot.py
# via scripts/aot_compile.py). It holds triton, numpy, CPU torch (the kernel modules import
# it) and pytest (the check imports the GPU tests' case grids); the repository itself runs
# from the checkout, nothing is installed from it. Kept until its pins change (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0"
  fi
  python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
deactivate

if [ "${1:-}" = "--with-triton36" ]; then
  pins=("triton==3.6.0" "numpy>=1.26,<2.6" "torch==2.13.0" "pytest>=8,<10")
  stamp36=.venv-triton36/.installed-$(printf '%s\n' "${pins[@]}" | sha1sum | cut -c1-12)
  if [ ! -f "$stamp36" ]; then
    rm -rf .venv-triton36
    "$PY" -m venv .venv-triton36
    .venv-triton36/bin/python -m pip install -q "${pins[@]}"
    touch "$stamp36"
  fi
fi
