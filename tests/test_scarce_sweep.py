"""The scarce-memory sweep (bench.scarce_sweep): budgets from static's peak live KV,
resumable runs keyed by their configuration, parallel runs gathered in a fixed order, a
failed run reported without losing the others, and the combined table and plots.

Every replay here uses the ``tiny`` model (1 KiB of KV per token, 2 MiB chunks) on short
synthesized bursts, so a sweep takes seconds.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from bench import scarce_sweep, traces

TINY = ["--model", "tiny", "--device-memory-gib", "0.25", "--activation-reserve-gib", "0.05",
        "--max-tokens", "256", "--arrival-reserve-s", "0"]
POLICIES = ("static", "on-demand", "windowed:empirical")


def _burst(tmp_path, name: str, n: int = 48, seed: int = 0):
    """``n`` requests arriving within 0.02 s (the simulated tiny model steps in well under a
    millisecond), 100-400 prompt and 100-250 output tokens: a peak live KV of several 2 MiB
    chunks, so 1/4 of it is at least one chunk, and decode growth makes the policies
    preempt there."""
    rng = np.random.default_rng(seed)
    t = traces.Trace(name, "test", np.sort(rng.uniform(0, 0.02, n)), rng.integers(100, 400, n),
                     rng.integers(100, 250, n))
    return traces.write_trace(t, tmp_path / f"{name}.csv")


def _execute(tmp_path, trace_paths, out, *, extra=TINY, **kw):
    named = scarce_sweep.resolve_traces([str(p) for p in trace_paths])
    return scarce_sweep.execute(named, out, list(POLICIES), [0.25], list(extra),
                                inline=True, log=lambda m: None, **kw)


def _fail_on_scarce_on_demand(spec, single_thread=False):
    if spec.fraction is not None and spec.policy == "on-demand":
        raise RuntimeError("injected failure")
    return scarce_sweep.run_one(spec, single_thread)


def test_budgets_come_from_static_peak_and_scarce_runs_preempt(tmp_path):
    out = tmp_path / "out"
    trace = _burst(tmp_path, "burst")
    res = _execute(tmp_path, [trace], out)
    assert not res.failures and len(res.ran) == 2 * len(POLICIES) and not res.skipped
    peak = res.records[("burst", "default", "static")]["summary"]["live_peak_gib"]
    for p in POLICIES:
        rec = res.records[("burst", "live_peak_x0.25", p)]
        assert rec["kv_budget_gib"] == pytest.approx(peak * 0.25, rel=1e-4)
        assert "--kv-budget-gib" in rec["config"]["replay_argv"]
        assert (out / "burst" / "live_peak_x0.25" / p.replace(":", "_") / "replay.json").is_file()
        assert rec["summary"]["mapped_peak_gib"] <= rec["kv_budget_gib"] + 1e-9
    assert res.records[("burst", "live_peak_x0.25", "on-demand")]["summary"]["preemptions"] > 0
    ents = scarce_sweep.entries(res, ["burst"], list(POLICIES), [0.25])
    assert [e["budget"] for e in ents] == ["default", "live_peak_x0.25"]
    assert [e["scarce_targets"][0]["regime"] for e in ents] == ["plentiful", "scarce"]
    # mapped / live over static's live KV for every policy (issue 9's common denominator)
    for e in ents:
        ref = next(p for p in e["policies"] if p["policy"] == "static")["live_avg_gib"]
        assert all(p["live_reference_avg_gib"] == ref for p in e["policies"])


def test_second_run_skips_force_reruns_and_a_changed_config_reruns(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trace = _burst(tmp_path, "burst")
    first = _execute(tmp_path, [trace], out)
    assert len(first.ran) == 6
    run_json = out / "burst" / "default" / "static" / "run.json"
    stamp = run_json.read_text()

    again = _execute(tmp_path, [trace], out)
    assert not again.ran and len(again.skipped) == 6
    assert run_json.read_text() == stamp
    assert again.records == first.records

    forced = _execute(tmp_path, [trace], out, force=True)
    assert len(forced.ran) == 6 and not forced.skipped
    assert json.loads(run_json.read_text())["wall_s"] != json.loads(stamp)["wall_s"]

    # another replay option: a different configuration, every run again
    changed = _execute(tmp_path, [trace], out, extra=[*TINY, "--token-budget", "1024"])
    assert len(changed.ran) == 6
    rec = json.loads(run_json.read_text())
    assert "1024" in rec["config"]["replay_argv"] and rec["config_hash"] != json.loads(stamp)[
        "config_hash"]

    # other code: rerun, unless told to ignore code changes
    monkeypatch.setattr(scarce_sweep, "code_fingerprint", lambda root=None: "other code")
    kept = _execute(tmp_path, [trace], out, extra=[*TINY, "--token-budget", "1024"],
                    ignore_code=True)
    assert not kept.ran
    rerun = _execute(tmp_path, [trace], out, extra=[*TINY, "--token-budget", "1024"])
    assert len(rerun.ran) == 6


def test_changed_trace_bytes_rerun_and_a_damaged_record_reruns(tmp_path):
    out = tmp_path / "out"
    trace = _burst(tmp_path, "burst")
    _execute(tmp_path, [trace], out)
    (out / "burst" / "default" / "on-demand" / "run.json").write_text("{not json")
    res = _execute(tmp_path, [trace], out)
    assert res.ran == ["burst / default / on-demand"]
    _burst(tmp_path, "burst", seed=1)              # same name, other requests
    assert len(_execute(tmp_path, [trace], out).ran) == 6


def test_a_failed_run_is_reported_and_the_others_are_written(tmp_path, capsys):
    out = tmp_path / "out"
    trace = _burst(tmp_path, "burst")
    res = _execute(tmp_path, [trace], out, runner=_fail_on_scarce_on_demand)
    assert res.failures == [{"trace": "burst", "budget": "live_peak_x0.25",
                             "policy": "on-demand", "error": "injected failure"}]
    assert len(res.ran) == 5
    assert not (out / "burst" / "live_peak_x0.25" / "on-demand" / "run.json").exists()
    assert (out / "burst" / "live_peak_x0.25" / "windowed_empirical" / "run.json").is_file()
    # the failed run alone is retried next time
    assert _execute(tmp_path, [trace], out).ran == ["burst / live_peak_x0.25 / on-demand"]


def test_parallel_results_match_serial_and_a_broken_trace_fails_alone(tmp_path, capsys):
    """--jobs 2 (worker processes) gives the same files as running each replay in turn in
    this process, in (trace, budget, policy) order; a trace whose CSV is broken fails its
    static default run, its scarce runs are reported as not run, and the other traces are
    still written (exit status 1)."""
    from bench import scarce_report

    a, b = _burst(tmp_path, "a", n=40, seed=2), _burst(tmp_path, "b", n=32, seed=3)
    bad = tmp_path / "broken.csv"
    bad.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,x\n")
    policies = ["static", "on-demand"]
    out = tmp_path / "jobs2"
    argv = ["--trace", str(a), "--trace", str(bad), "--trace", str(b), "--out", str(out),
            "--jobs", "2", "--fraction", "0.25", "--policy", "on-demand", "--", *TINY]
    assert scarce_sweep.main(argv) == 1
    j2, md2 = json.loads((out / "scarce.json").read_text()), (out / "scarce.md").read_text()
    for tr in ("a", "b"):
        assert (out / f"scarce_{tr}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "scarce_broken.png").exists()     # nothing to plot
    assert (out / "scarce.png").stat().st_size > 10_000

    serial = tmp_path / "serial"
    named = scarce_sweep.resolve_traces([str(a), str(bad), str(b)])
    res = scarce_sweep.execute(named, serial, policies, [0.25], TINY, inline=True,
                               log=lambda m: None)
    ents = scarce_sweep.entries(res, [n for n, _ in named], policies, [0.25])
    md1 = scarce_report.write(serial, ents, res.failures, command="", plot_files=False)
    j1 = json.loads((serial / "scarce.json").read_text())
    assert md1 == md2
    assert j1["entries"] == j2["entries"] and j1["failures"] == j2["failures"]
    assert [(e["trace"], e["budget"]) for e in j2["entries"]] == [
        ("a", "default"), ("a", "live_peak_x0.25"), ("b", "default"), ("b", "live_peak_x0.25")]
    assert [p["policy"] for p in j2["entries"][0]["policies"]] == policies
    failed = [(f["trace"], f["budget"], f["policy"]) for f in j2["failures"]]
    assert failed[0] == ("broken", "default", "static")
    assert set(failed) == {("broken", bud, p) for bud in ("default", "live_peak_x0.25")
                           for p in policies}
    assert "## Failed runs" in md2 and "line 2" in md2
    assert "| a | default" in md2 and "| b | 0.25 x peak live" in md2
    # scarce.json lists each run's cost in (trace, budget, policy) order
    assert [(r["trace"], r["budget"], r["policy"]) for r in j2["runs"]] == [
        (t, bud, p) for t in ("a", "b") for bud in ("default", "live_peak_x0.25")
        for p in policies]
    assert all(r["cpu_s"] > 0 and not r["stored"] for r in j2["runs"])
    # each run had its own worker process: its peak RSS is recorded
    rec = json.loads((out / "a" / "default" / "static" / "run.json").read_text())
    assert 0 < rec["process_max_rss_gib"] < 8


def test_runs_at_once_stay_within_the_memory_limit():
    def run(budget):
        return scarce_sweep.RunSpec("t", "t.csv", "", None if budget is None else 0.25, budget,
                                    "static", (), "", "out")
    big, small, default = run(10.0), run(1.0), run(None)
    assert scarce_sweep.memory_estimate_gib(big) > scarce_sweep.memory_estimate_gib(small) \
        > scarce_sweep.memory_estimate_gib(default)
    pick = scarce_sweep.pick_next
    assert pick([big], [], 4.0) == 0                    # alone, even over the limit
    assert pick([big, small], [default], 6.0) == 1      # the big one waits, the small one fits
    assert pick([big], [small], 6.0) is None
    assert pick([big], [big], None) == 0                # no limit
    assert pick([], [], 6.0) is None


def test_no_plot_writes_tables_only(tmp_path):
    out = tmp_path / "out"
    trace = _burst(tmp_path, "burst", n=24)
    assert scarce_sweep.main(["--trace", str(trace), "--out", str(out), "--fraction", "0.5",
                              "--policy", "on-demand", "--no-plot", "--", *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["burst", "scarce.json", "scarce.md"]


@pytest.mark.parametrize("argv, names", [
    (["--jobs", "0"], "--jobs"),
    (["--fraction", "0"], "--fraction"),
    (["--fraction", "1.5"], "--fraction"),
    (["--policy", "windowed:nope"], "policy"),
    (["--", "--policy", "static"], "--policy"),
    (["--", "--token-budget", "many"], "--token-budget"),
])
def test_bad_arguments_exit_2_before_any_run(tmp_path, capsys, argv, names):
    trace = _burst(tmp_path, "burst", n=4)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        scarce_sweep.main(["--trace", str(trace), "--out", str(out), *argv])
    assert exc.value.code == 2
    assert names in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_unknown_trace_name_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        scarce_sweep.main(["--trace", "no_such_trace", "--out", str(tmp_path / "o")])
    assert "--trace" in capsys.readouterr().err
