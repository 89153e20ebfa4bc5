#!/usr/bin/env bash
# One call on a lent GPU machine: versions, the GPU-marked tests, then every benchmark.
#
#   usage: bash scripts/gpu_check.sh [--dry-run]
#   device call:  run(command="bash scripts/gpu_check.sh", timeout_s=480)
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
# (GPU_CHECK_BUDGET_S, default 420 s), so even when every step hangs the script ends in
# 7 minutes: with a machine start of 1-2 minutes that leaves a 15-minute lease room for a
# rerun. Each step's elapsed time is printed and recorded.
# Expected cold on an H100/H200: about 4 to 5 minutes (220-290 s). Method: the Triton
# compiles were counted and timed on CPU for sm_90 through the JIT's own binder (a stand-in
# driver with an sm_90 target, the benchmarks' and GPU tests' real launchers over their real
# grids with meta tensors, a cold cache; scripts/aot_compile.py does exactly this and prints
# each specialisation's compile time) on a 2-core Xeon at 2.3 GHz shared with other jobs
# (2026-12-01; ranges are quiet vs busy, triton 3.9):
#   bench_decode      18 specialisations (6 decode + 12 merge)   19-49 s
#   bench_prefill      4 specialisations                          15-22 s
#   decode GPU tests  24 more specialisations                     45 s (busy)
#   bench_arena        2 (aligned and 8-byte-offset move lists)   ~1 s
# All kernels, all GPU tests and benchmarks: 65 specialisations, 127 s (3.9) / 169 s (3.6,
# the GPU image's triton) of single-process compile on that CPU; the test files run as
# parallel processes, so that step costs its slowest file: ~45-60 s of compiles plus ~15 s
# of imports and CUDA start. Non-compile time per benchmark shape: inputs
# plus, for ours and the baseline each, 50 ms eager events + 30 host-timed calls + 10 graph
# replays of ~20 ms: ~1.1 s; decode 32 shapes ~35 s, prefill 6 ~8 s, arena ~10 s;
# FlexAttention 2 torch.compile runs of ~20-40 s. Sum: versions ~10 s + tests 60-90 +
# arena ~15 + decode ~60 + prefill ~25 + flex 50-90 = 220-290 s.
# Step limits (s): versions 30, tests 120, arena 45, decode 120, prefill 60, flex 75.
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
budget=${GPU_CHECK_BUDGET_S:-420}
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
  local t; t=$(limit_for gpu_tests 120)
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

step versions 30 "$PY" -c '
import json, os, sys, torch
from bench._common import environment
env = environment("cuda" if torch.cuda.is_available() else "cpu")
json.dump(env, open(os.path.join(sys.argv[1], "environment.json"), "w"), indent=2)
v = env["versions"]
print("device", env.get("device"), "| driver", env.get("driver", "n/a"), "| cuda", env.get("cuda", "n/a"))
print(" | ".join(f"{k} {v[k]}" for k in v))' "$out"
gpu_tests
step bench_arena 45 "$PY" -m bench.bench_arena --out "$out" "${tiny[@]}"
step bench_decode 120 "$PY" -m bench.bench_decode --out "$out" "${tiny[@]}"
step bench_prefill 60 "$PY" -m bench.bench_prefill --out "$out" "${tiny[@]}"
step flex 75 "$PY" -m bench.bench_decode --flex --out "$out" "${tiny[@]}"

say ""
say "=== summary (step, rc, seconds; total ${SECONDS} s)"
column -t -s $'\t' "$steps" 2>/dev/null | tee -a "$log" || cat "$steps"
exit $status
