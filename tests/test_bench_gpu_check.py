"""scripts/gpu_check.sh's own logic, on CPU, with a stub interpreter standing in for every
step: a hanging step is killed by its timeout and the later steps still run; a crashing
test file does not take the others down; what a step wrote before dying stays in $OUT; the
folder that comes back stays within the device tool's limits (8 files, no sub-folders)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")

# The stub: versions through the real interpreter (CPU), every other step faked by what its
# arguments name. bench_arena writes its JSON and then hangs (killed by its timeout);
# test_write_kv crashes like an illegal memory access; the flex step fails.
STUB = r"""#!/usr/bin/env bash
args="$*"
case "$args" in
  *"-m pytest"*test_write_kv.py*) echo "crashing"; kill -SEGV $$ ;;
  *"-m pytest"*) echo "1 passed in 0.01s"; exit 0 ;;
  *bench.bench_arena*) echo '{"map_unmap": {"map_s_median": 1e-5}}' > "$OUT/arena.json"
                      echo "map written"; sleep 60 ;;
  *"bench.bench_decode --flex"*) echo "flex broke" >&2; exit 3 ;;
  *bench.bench_decode*) echo '{"results": []}' > "$OUT/decode_attention.json"; exit 0 ;;
  *bench.bench_prefill*) echo '{"results": []}' > "$OUT/prefill_attention.json"; exit 0 ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def _run(tmp_path, **env_extra):
    stub = tmp_path / "stub-python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_PYTHON": str(stub),
           "REAL_PYTHON": sys.executable, **env_extra}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    steps = {}
    for line in (out / "steps.tsv").read_text().splitlines()[1:]:
        name, rc, secs = line.split("\t")
        steps[name] = (rc, int(secs))
    return proc, out, steps, time.monotonic() - t0


def test_timeout_crash_and_failure_keep_the_rest(tmp_path):
    proc, out, steps, wall = _run(tmp_path, GPU_CHECK_T_BENCH_ARENA="3")
    assert proc.returncode == 1, proc.stdout[-2000:]
    # The hanging step was killed at its limit, not after its 60 s sleep.
    rc, secs = steps["bench_arena"]
    assert rc == "124" and secs <= 10
    assert "bench_arena TIMED OUT" in proc.stdout
    # What it wrote before the kill is kept.
    assert "map_s_median" in (out / "arena.json").read_text()
    # The steps after it ran; the failing one is recorded with its status.
    assert steps["bench_decode"][0] == "0" and steps["bench_prefill"][0] == "0"
    assert steps["flex"][0] == "3"
    # A crashing test file (SIGSEGV) is one failure; the other files still ran and passed.
    assert steps["gpu_tests:test_write_kv"][0] == "139"
    others = [k for k in steps if k.startswith("gpu_tests:") and k != "gpu_tests:test_write_kv"]
    assert len(others) >= 3 and all(steps[k][0] == "0" for k in others)
    assert "crashing" in (out / "gpu_tests.log").read_text()
    # Versions really ran (on CPU) and were written.
    assert steps["versions"][0] == "0"
    assert '"versions"' in (out / "environment.json").read_text()
    assert wall < 120
    # The folder that comes back: at most 8 files, all at its top level.
    entries = list(out.iterdir())
    assert len(entries) <= 8 and all(p.is_file() for p in entries), entries
    assert "=== summary" in proc.stdout and "bench_arena" in (out / "gpu_check.log").read_text()


def test_global_budget_skips_steps_instead_of_overrunning(tmp_path):
    proc, out, steps, wall = _run(tmp_path, GPU_CHECK_BUDGET_S="3",
                                  GPU_CHECK_STEPS="bench_arena,bench_decode,flex")
    assert proc.returncode == 1
    assert wall < 30
    assert steps["bench_arena"] == ("124", 3)       # its 60 s limit clipped to the budget
    assert steps["bench_decode"][0] == steps["flex"][0] == "skipped"
    assert "budget is spent" in proc.stdout
    assert not any(k.startswith("gpu_tests") for k in steps)   # not selected


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
