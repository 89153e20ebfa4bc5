"""The engine's benchmark and trace replay run end to end on the CPU (tiny configurations)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench import bench_engine, replay
from bench.traces import load_trace
from tests.test_engine import torch_kernels  # noqa: F401


def test_kv_replay_with_the_real_engine(tmp_path, torch_kernels, capsys):
    out = tmp_path / "r"
    rc = replay.main(["--engine", "model", "--model", "tiny-qwen3", "--max-requests", "3",
                      "--max-prompt-tokens", "24", "--max-output-tokens", "4", "--policy",
                      "static", "--policy", "windowed:empirical", "--out", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads((out / "replay.json").read_text())
    want = int(np.minimum(load_trace(None).output_tokens[:3], 4).sum())
    assert [p["policy"] for p in doc["policies"]] == ["static", "windowed:empirical"]
    for p in doc["policies"]:
        assert p["requests_finished"] == 3 and p["output_tokens"] == want
        assert p["info"]["model_time_s"] > 0 and p["info"]["steps"] > 0
    assert "| mapped KV, time avg (GiB) |" in (out / "table.md").read_text()
    assert "windowed:empirical" in capsys.readouterr().out


def test_kv_replay_engine_rejects_bad_arguments(tmp_path):
    for bad in (["--policy", "lazy"], ["--model", "gpt-9"], ["--max-requests", "0"],
                ["--kv-cache-gib", "-1"], ["--kv-cache-gib", "nan"], ["--kv-cache-gib", "0"],
                ["--kv-cache-gib", "1e-6"], ["--block-size", "0"], ["--max-num-seqs", "0"],
                ["--max-num-batched-tokens", "0"], ["--seed", "-1"],
                ["--policy", "windowed:foo"], ["--device", "bogus"]):
        with pytest.raises(SystemExit) as e:
            replay.main(["--engine", "model", "--out", str(tmp_path), "--quiet", *bad])
        assert e.value.code == 2


def test_bench_engine_smoke(tmp_path, torch_kernels):
    assert bench_engine.main(["--smoke", "--num-seqs", "2", "--prompt-len", "8",
                              "--output-len", "3", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "engine_smoke.json").read_text())
    rows = {r["policy"]: r for r in doc["results"]}
    assert set(rows) == {"static", "windowed", "transformers.generate"}
    assert all(r["output_tokens"] == 6 and r["tokens_per_s"] > 0 for r in rows.values())
    assert doc["environment"]["device"].startswith("cpu") and doc["versions"]["transformers"]
    assert doc["ratios"]["windowed_over_static"] > 0


def test_kv_replay_engine_checks_out_before_any_compute(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(SystemExit) as e:
        replay.main(["--engine", "model", "--out", str(target), "--quiet"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
