"""bench.summarize_replays renders REPLAY.md's tables from replay folders."""
from __future__ import annotations

import numpy as np

from bench import replay, summarize_replays, traces


def test_tables_come_from_the_replay_json(tmp_path, capsys):
    rng = np.random.default_rng(1)
    t = traces.Trace("t", "test", np.sort(rng.uniform(0, 0.05, 12)), rng.integers(20, 80, 12),
                     rng.integers(5, 30, 12))
    path = traces.write_trace(t, tmp_path / "t.csv")
    root = tmp_path / "replay"
    assert replay.main(["--trace", str(path), "--out", str(root / "mooncake_synthetic"),
                        "--model", "tiny", "--device-memory-gib", "0.25",
                        "--activation-reserve-gib", "0.05", "--quiet", "--no-plot",
                        "--policy", "static", "--policy", "on-demand",
                        "--policy", "windowed:empirical"]) == 0
    capsys.readouterr()
    assert summarize_replays.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "## Targets" in out and "| target (windowed:empirical vs static) |" in out
    assert "### mooncake_synthetic" in out and "12 requests" in out
    assert "| metric | static | on-demand | windowed:empirical |" in out
    assert summarize_replays.main([str(tmp_path / "nothing")]) == 1
