"""The planner benchmark's script: a short run writes its JSON, with an earlier run's
medians recorded next to its own when given one."""
import json

import pytest

from bench import bench_planner


def test_a_short_run_records_the_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    old = {"commit": "abc1234", "cpu_model": "cpu", "load_avg_1min": 0.5,
           "environment": {"date_utc": "2026-01-01T00:00:00+00:00"},
           "results": [{"scenario": "decode", "median_us": 40.0},
                       {"scenario": "mixed", "median_us": 150.0}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert bench_planner.main(["--repeats", "2", "--rounds", "1",
                               "--baseline", str(tmp_path / "old.json")]) == 0
    doc = json.loads((tmp_path / "planner.json").read_text())
    by = {r["scenario"]: r for r in doc["results"]}
    assert set(by) == {"decode", "mixed", "preempt"}
    assert by["decode"]["baseline_median_us"] == 40.0
    assert by["mixed"]["baseline_median_us"] == 150.0
    assert "baseline_median_us" not in by["preempt"]      # the old run did not have it
    assert by["mixed"]["admitted"] > 0 and by["preempt"]["preempted"] > 0
    assert doc["baseline"]["commit"] == "abc1234" and doc["baseline"]["median_us"]["decode"] == 40
    assert all(r["median_us"] > 0 for r in doc["results"])


@pytest.mark.parametrize("args", [["--baseline", "missing.json"], ["--repeats", "0"]])
def test_bad_arguments_exit_before_measuring(tmp_path, monkeypatch, args):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        bench_planner.main(args)
    assert e.value.code == 2 and not (tmp_path / "planner.json").exists()
