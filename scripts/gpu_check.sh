#!/usr/bin/env bash
# One call on a lent GPU machine: the GPU-marked tests, then every benchmark.
#
# The lent machines reach no package registry, so nothing is installed: the checkout runs
# from PYTHONPATH against the machine's own torch, triton, cupy and cuda-bindings (compiled
# Triton is not affected by the interpreter's triton >= 3.8 requirement). JSON results land
# in bench/results/ (commit them) and, with logs, in $OUT when the device tool sets it.
#   usage: bash scripts/gpu_check.sh [--quick]     (--quick: a corner of the decode grid)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD TRITON_INTERPRET=0
out=${OUT:-bench/results}
mkdir -p "$out"
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
status=0
run() {  # run NAME CMD...: log to $out/NAME.log, remember a failure, go on
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > "$out/$name.log" 2>&1 || { echo "!!! $name failed (rc=$?)"; status=1; }
  tail -n 25 "$out/$name.log"
}
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, \
'numpy', numpy.__version__, torch.cuda.get_device_name())"
run gpu_tests python3 -m pytest -m gpu -q -p no:cacheprovider tests
run bench_arena python3 -m bench.bench_arena
run bench_decode python3 -m bench.bench_decode "${quick[@]}"
run bench_prefill python3 -m bench.bench_prefill
[ "$out" != bench/results ] && cp bench/results/*.json "$out"/ 2>/dev/null
exit $status
