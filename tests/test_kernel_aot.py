"""Every kernel specialisation the GPU tests and benchmarks launch compiles for sm_90
without register spills, under the pinned triton and (when the test command has set it
up) under the GPU machine's triton 3.6. See scripts/aot_compile.py for how: a stand-in
sm_90 driver, the JIT's own binder, ptxas and cuobjdump from the triton wheel.

``KVARENA_AOT_PYTHONS`` (set by scripts/run_tests.sh) lists further interpreters, each in
an environment with another triton; the test fails if one of them is missing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "aot_compile.py"
KERNELS = {"_write_kv_kernel", "_decode_split_kernel", "_merge_splits_kernel",
           "_prefill_kernel", "_compact_kernel"}


def _pythons():
    extra = [p for p in os.environ.get("KVARENA_AOT_PYTHONS", "").split(os.pathsep) if p]
    return [sys.executable] + extra


@pytest.mark.parametrize("python", _pythons(), ids=lambda p: Path(p).parts[-3]
                         if len(Path(p).parts) > 3 else p)
def test_every_launched_specialisation_compiles_for_sm90_without_spills(python, tmp_path):
    assert Path(python).exists(), f"{python} (from KVARENA_AOT_PYTHONS) does not exist"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "aot.json"
    proc = subprocess.run([python, str(SCRIPT), "--quiet", "--json", str(report)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert report.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert not doc["failures"], json.dumps(doc["failures"], indent=1)[:6000]
    assert not doc["spilled"], json.dumps(doc["spilled"], indent=1)[:6000]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r["kernel"] for r in doc["rows"]} == KERNELS
    for r in doc["rows"]:
        assert r["shared_bytes"] <= 232448, r  # fits an H100/H200 block
        # Hopper tensor cores: every 16-bit prefill build uses wgmma.
        if r["kernel"] == "_prefill_kernel" and r["signature"]["q_ptr"] in ("*fp16", "*bf16"):
            assert r["wgmma"] > 0, r
    print(json.dumps({k: doc[k] for k in ("triton", "specialisations", "wall_s",
                                          "per_kernel")}))
