"""Benchmarks write their JSON row by row and keep going past a failing shape; timing
helpers report kernel, eager and host-launch figures. CPU only (tiny dry-run shapes)."""
from __future__ import annotations

import json

import pytest
import torch

from bench import _common, bench_arena, bench_decode, bench_prefill


def _doc(path):
    return json.loads(path.read_text())


def test_result_file_is_valid_json_after_every_row(tmp_path):
    res = _common.ResultFile("x", tmp_path, workload={"a": 1})
    assert _doc(res.path)["workload"] == {"a": 1} and "environment" in _doc(res.path)
    res.add("results", {"v": 1.0})
    res.add("results", {"v": float("nan")})
    res.set("bw", 2.5)
    doc = _doc(res.path)
    assert doc["results"] == [{"v": 1.0}, {"v": None}] and doc["bw"] == 2.5
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]   # no temporaries left


def test_results_go_to_OUT_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert _common.results_dir() == tmp_path
    assert _common.results_dir(tmp_path / "y") == tmp_path / "y"
    monkeypatch.delenv("OUT")
    assert _common.results_dir() == _common.RESULTS_DIR


def test_environment_records_versions():
    env = _common.environment("cpu")
    assert env["versions"]["torch"] and env["versions"]["numpy"]
    # cupy and cuda-bindings are always named, installed or not
    assert any(k.startswith("cupy") for k in env["versions"])
    assert any(k.startswith("cuda-") for k in env["versions"])
    assert "date_utc" in env and env["device"].startswith("cpu")


def test_time_kernel_on_cpu_reports_all_figures():
    calls = []
    row = _common.time_kernel(lambda: calls.append(1), rep_ms=5)
    assert set(row) >= {"kernel_s", "eager_s", "host_launch_s", "kernel_method"}
    assert row["kernel_s"] > 0 and len(calls) >= 4
    assert _common.host_call_seconds(lambda: None, calls=3, trials=2) >= 0


def test_decode_failing_shape_keeps_the_others(tmp_path, monkeypatch):
    shapes = ((torch.float16, 1, 32), (torch.float16, 2, 48), (torch.bfloat16, 1, 16))

    def fake_measure(batch, context, dtype):
        if batch == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        # the row written for the shape before must already be on disk
        return {**bench_decode._head(batch, context, dtype), "seconds": 1e-5,
                "ours": {"host_launch_s": 1e-4}, "kv_bytes_per_s": 1e9}

    monkeypatch.setattr(bench_decode, "TINY_SHAPES", shapes)
    monkeypatch.setattr(bench_decode, "measure", fake_measure)
    rows = bench_decode.run(out_dir=tmp_path, tiny=True)
    assert [("error" in r) for r in rows] == [False, True, False]
    doc = _doc(tmp_path / "decode_attention.json")
    assert len(doc["results"]) == 3 and "illegal memory access" in doc["results"][1]["error"]
    assert doc["copy_bandwidth_Bps"] > 0


def test_decode_tiny_dry_run_matches_sdpa(tmp_path):
    assert bench_decode.main(["--tiny", "--out", str(tmp_path)]) == 0
    (row,) = _doc(tmp_path / "decode_attention.json")["results"]
    assert row["max_abs_diff_vs_sdpa"] < 1e-2
    assert row["seconds"] > 0 and row["ours"]["kernel_method"].startswith("host clock")
    assert bench_decode.main(["--tiny", "--flex", "--out", str(tmp_path)]) == 0
    assert "skipped" in _doc(tmp_path / "flex_attention.json")["results"][0]


def test_arena_map_unmap_written_before_compaction(tmp_path, monkeypatch):
    seen = []

    def failing_compaction(device, num_blocks, moves):
        seen.append(_doc(tmp_path / "arena.json"))
        raise RuntimeError("compaction kernel failed to compile")

    monkeypatch.setattr(bench_arena, "compaction_bandwidth", failing_compaction)
    assert bench_arena.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    assert seen and seen[0]["map_unmap"]["map_s_median"] > 0
    doc = _doc(tmp_path / "arena.json")
    assert doc["map_unmap"]["chunks"] == 4
    assert doc["compaction"][0]["error"].startswith("RuntimeError")


def test_prefill_failing_row_is_recorded(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("tile does not fit in shared memory")
    monkeypatch.setattr(bench_prefill, "measure", broken)
    rows = bench_prefill.run(tmp_path, tiny=True)
    assert rows[0]["error"].startswith("ValueError")
    assert _doc(tmp_path / "prefill_attention.json")["results"] == rows


@pytest.mark.parametrize("gpu", [True, False])
def test_compaction_cases_include_few_moves(gpu):
    moves = [m for _, m in bench_arena.compaction_cases(gpu)]
    assert 1 in moves and max(moves) >= 8


# ------------------------------------------------------------------ kernel warm-up
@pytest.mark.parametrize("n, small, want", [(1, 32, 1), (4096, 32, 32), (48, 16, 16),
                                            (4097, 32, 33), (7, 16, 17), (2, 2, 3)])
def test_warm_up_sizes_keep_the_specialisation_class(n, small, want):
    from bench.kernel_warmup import same_class

    got = same_class(n, small)
    assert got == want
    assert (got == 1) == (n == 1) and (got % 16 == 0) == (n % 16 == 0)


def test_warm_up_does_nothing_on_the_host_backend():
    from arena import KVSpec, PagedArena
    from bench.kernel_warmup import warm_up_compaction

    arena = PagedArena(KVSpec(2, 2, 16, 16, torch.float16), 4 << 20, "cpu")
    try:
        assert warm_up_compaction(arena) == 0.0
        assert arena.mapped_bytes == 0
    finally:
        arena.close()


@pytest.mark.gpu
def test_warm_up_leaves_nothing_to_compile_for_shrinks():
    """After the warm-up, shrinks with 1, few and 16*k moves launch no new compile."""
    import kernels.compact as kc
    from arena import KVSpec, PagedArena
    from bench.kernel_warmup import warm_up_compaction

    spec = KVSpec(2, 2, 64, 16, torch.float16)
    arena = PagedArena(spec, 64 << 20, "cuda", max_seqs=8, max_blocks_per_seq=64)
    try:
        warm_up_compaction(arena)
        dev = torch.cuda.current_device()
        compiled = len(kc._compact_kernel.device_caches[dev][0])
        pool = arena.pool("p")
        bpc = arena.blocks_per_chunk
        for moves in (1, 5, 16):
            pool.resize(2 * bpc)
            ids = pool.allocate(bpc + moves)      # the lowest blocks: chunk 0 and a few above
            pool.free(ids[:bpc])                  # empty chunk 0: a shrink moves `moves` down
            pool.resize(moves)
            src, _ = arena.shrink()
            assert len(src) == moves
            pool.free(pool.owned())
            pool.resize(0)
            arena.shrink()
        assert len(kc._compact_kernel.device_caches[dev][0]) == compiled
    finally:
        arena.close()


WARMUP_KEYS_SCRIPT = r"""
import json, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction
import kernels.compact as kc
from kernels import _runtime
from arena import KVSpec
from bench.kernel_warmup import compaction_launches

class Sm90:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("meta")

driver.set_active(Sm90())
keys = []
def record(self, *args, grid, warmup, **kwargs):
    binder = self.device_caches[0][-1]
    keys.append(str(binder(*args, **kwargs)[1]))
JITFunction.run = record
_runtime.use_triton = lambda *t: True
# meta tensors would dispatch the custom op to its fake: call its body, as CUDA does
kc.compact_blocks_op = kc.compact_blocks_op._init_fn

spec = KVSpec(32, 8, 128, 16, torch.float16)
out = {}
for capacity, table_numel in ((4096, 256 * 512), (4097, 255 * 511), (2000, 0)):
    keys.clear()
    compaction_launches("meta", spec, capacity, table_numel)
    warm = set(keys)
    keys.clear()
    blocks = torch.empty((capacity, *spec.block_shape), dtype=spec.dtype, device="meta")
    table = torch.empty(table_numel, dtype=torch.int32, device="meta") if table_numel else None
    for moves in (1, 2, 3, 7, 15, 16, 17, 32, 48, 100, 1024):   # what shrinks launch
        src = torch.empty(moves, dtype=torch.int64, device="meta")
        kc.compact_blocks(blocks, src, torch.empty_like(src), table)
    out[str(capacity)] = [len(warm), len(set(keys) - warm)]
print(json.dumps(out))
"""


def test_warm_up_covers_every_shrink_specialisation_on_sm90():
    """Through Triton's own binder with an sm_90 target (no GPU, nothing compiled): every
    specialisation key a shrink of the arena can launch is one the warm-up launched."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", WARMUP_KEYS_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for capacity, (warm, missing) in result.items():
        assert warm >= 1 and missing == 0, (capacity, warm, missing)
