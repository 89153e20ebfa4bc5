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
