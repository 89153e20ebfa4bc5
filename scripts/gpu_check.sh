#!/usr/bin/env bash
# One call on a lent GPU machine: versions, the GPU-marked tests, then every benchmark.
#
#   usage: bash scripts/gpu_check.sh [--dry-run]
#   device call:  run(command="bash scripts/gpu_check.sh", timeout_s=420)
#
# Nothing is installed (the lent machines reach no registry): the checkout runs from
# PYTHONPATH against the machine's own torch, triton, cupy and cuda-bindings.
#
# Results go to $OUT (the folder that comes back; else bench/results/gpu_check), at most 8
# files, none in sub-folders: gpu_check.log (everything printed), environment.json,
# steps.tsv (step, exit status, seconds; one row per step and per test file),
# gpu_tests.log, arena.json, decode_attention.json, flex_attention.json,
# prefill_attention.json. Each benchmark rewrites its JSON after every row or section and
# catches errors per shape, so a step killed by its timeout keeps what it measured; arena
# map/unmap figures are written before compaction is tried.
#
# Time: every step runs under `timeout`, and no step may run past a global budget
# (GPU_CHECK_BUDGET_S, default 540 s), so the script ends inside one 10-minute device call
# even when every step hangs; each step's elapsed time is printed and recorded.
# Expected cold on an H100/H200: about 4 to 5 minutes. Method: the Triton compiles were
# counted and timed on CPU for sm_90 through the JIT's own binder (scripts/
# gpu_check_estimate.py: a stand-in driver with an sm_90 target, the benchmarks' real
# launchers over their real grids with meta tensors, a cold cache). On a 2-core Xeon
# (2.3 GHz, shared; triton 3.9) that gave: bench_decode 18 specialisations (6 decode + 12
# merge) in 20 s, bench_prefill 4 in 15 s, bench_arena 3 in ~2 s. The GPU tests were
# counted by hand from their parameter lists: ~10 decode cases x 2-3 split variants
# (~1.6 s each plus ~0.5 s per merge), ~11 prefill cases (~4 s each), 6 write_kv and a few
# compaction variants: ~110 s of compiles, spread over one pytest process per file, run in parallel
# (~40 s each plus ~10 s imports and CUDA start). Non-compile time: decode 32 shapes x
# ~1.5 s (inputs, 3 timings of 0.1 s each for ours and SDPA), prefill 6 x ~1 s, arena
# ~10 s, FlexAttention 2 torch.compile runs at ~20-40 s each. Sum: versions ~10 s + tests
# ~60-90 s + arena ~15 s + decode ~70 s + prefill ~25 s + flex ~60-90 s = 240-300 s.
# Step limits (s): tests 150, arena 60, decode 150, prefill 75, flex 90.
#
# --dry-run: every step on CPU with tiny shapes through Triton's interpreter (the GPU tests
# skip): checks the plumbing, not the numbers. GPU_CHECK_PYTHON overrides the interpreter
# (tests use a stub); GPU_CHECK_T_<STEP> overrides one step's limit in seconds;
# GPU_CHECK_STEPS=versions,bench_decode runs only the steps named.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${GPU_CHECK_PYTHON:-python3}
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  tiny=(--tiny)
else
  export TRITON_INTERPRET=0
  tiny=()
fi
out=${OUT:-bench/results/gpu_check}
mkdir -p "$out"
log=$out/gpu_check.log
steps=$out/steps.tsv
: > "$log"
printf 'step\trc\tseconds\n' > "$steps"
budget=${GPU_CHECK_BUDGET_S:-540}
deadline=$((SECONDS + budget))
status=0

say() { echo "$*" | tee -a "$log"; }

limit_for() {  # limit_for NAME DEFAULT: the step's limit, clipped to what the budget leaves
  local var="GPU_CHECK_T_${1^^}" left=$((deadline - SECONDS))
  local t=${!var:-$2}
  [ "$t" -gt "$left" ] && t=$left
  echo "$t"
}

wanted() {  # GPU_CHECK_STEPS=a,b: run only those steps (all when unset)
  [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]
}

step() {  # step NAME LIMIT CMD...: run CMD under timeout, output to the log, record rc and time
  local name=$1 t; t=$(limit_for "$1" "$2"); shift 2
  wanted "$name" || return 0
  if [ "$t" -le 0 ]; then
    say "=== $name: skipped, the ${budget} s budget is spent"
    printf '%s\tskipped\t0\n' "$name" >> "$steps"; status=1; return
  fi
  say "=== $name (limit ${t} s): $*"
  local t0=$SECONDS rc
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  printf '%s\t%s\t%s\n' "$name" "$rc" "$dt" >> "$steps"
  if [ "$rc" = 0 ]; then say "--- $name ok in ${dt} s"
  else
    [ "$rc" = 124 ] && say "!!! $name TIMED OUT after ${dt} s" || say "!!! $name failed (rc=$rc) after ${dt} s"
    status=1
  fi
}

gpu_tests() {  # one pytest process per file, all at once: a crash (illegal address) stays in its file
  wanted gpu_tests || return 0
  local t; t=$(limit_for gpu_tests 150)
  if [ "$t" -le 0 ]; then say "=== gpu_tests: skipped, the ${budget} s budget is spent"; status=1; return; fi
  say "=== gpu_tests (limit ${t} s, one process per file, in parallel)"
  local t0=$SECONDS tmp; tmp=$(mktemp -d)
  local files; files=$(grep -l "mark.gpu" tests/test_*.py)
  printf '%s\n' $files | timeout -k 5 "$((t + 10))" xargs -P 8 -I{} bash -c '
    f={}; b=$(basename $f .py); s=$SECONDS
    timeout -k 5 '"$t"' '"$PY"' -m pytest -m gpu -q -p no:cacheprovider --durations=5 "$f" > '"$tmp"'/$b.log 2>&1
    echo "$? $((SECONDS - s))" > '"$tmp"'/$b.rc'
  for f in $files; do
    local b; b=$(basename "$f" .py); local rc=missing dt=0
    [ -f "$tmp/$b.rc" ] && read -r rc dt < "$tmp/$b.rc"
    { echo "=== $f: rc=$rc in ${dt} s"; cat "$tmp/$b.log" 2>/dev/null; } >> "$out/gpu_tests.log"
    printf 'gpu_tests:%s\t%s\t%s\n' "$b" "$rc" "$dt" >> "$steps"
    # 5 = no test selected (a file whose GPU tests were all deselected) is not a failure
    if [ "$rc" = 0 ] || [ "$rc" = 5 ]; then say "    $b: ok in ${dt} s"
    else say "!!! $b: rc=$rc in ${dt} s"; status=1; fi
    tail -n 3 "$tmp/$b.log" 2>/dev/null | tee -a "$log"
  done
  rm -rf "$tmp"
  say "--- gpu_tests done in $((SECONDS - t0)) s"
}

step versions 60 "$PY" -c '
import json, os, sys, torch
from bench._common import environment
env = environment("cuda" if torch.cuda.is_available() else "cpu")
json.dump(env, open(os.path.join(sys.argv[1], "environment.json"), "w"), indent=2)
v = env["versions"]
print("device", env.get("device"), "| driver", env.get("driver", "n/a"), "| cuda", env.get("cuda", "n/a"))
print(" | ".join(f"{k} {v[k]}" for k in v))' "$out"
gpu_tests
step bench_arena 60 "$PY" -m bench.bench_arena --out "$out" "${tiny[@]}"
step bench_decode 150 "$PY" -m bench.bench_decode --out "$out" "${tiny[@]}"
step bench_prefill 75 "$PY" -m bench.bench_prefill --out "$out" "${tiny[@]}"
step flex 90 "$PY" -m bench.bench_decode --flex --out "$out" "${tiny[@]}"

say ""
say "=== summary (step, rc, seconds; total ${SECONDS} s)"
column -t -s $'\t' "$steps" 2>/dev/null | tee -a "$log" || cat "$steps"
exit $status
