"""Trace replay: trace loading and its errors, report metrics on hand-computed timelines, and
an end-to-end run of the CLI on a tiny trace with every policy."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import report, traces

HEADER = "arrival_s,prompt_tokens,output_tokens\n"


def _write(tmp_path, body: str, name: str = "t.csv"):
    p = tmp_path / name
    p.write_text(body)
    return p


# ------------------------------------------------------------------------------ traces
def test_load_trace_reads_columns(tmp_path):
    p = _write(tmp_path, HEADER + "0.0,10,5\n0.5,20,1\n\n2.25,3,7\n")
    t = traces.load_trace(p)
    assert len(t) == 3
    assert t.arrival_s.dtype == np.float64 and t.prompt_tokens.dtype == np.int64
    np.testing.assert_allclose(t.arrival_s, [0.0, 0.5, 2.25])
    np.testing.assert_array_equal(t.prompt_tokens, [10, 20, 3])
    np.testing.assert_array_equal(t.output_tokens, [5, 1, 7])
    assert t.duration_s == pytest.approx(2.25)


@pytest.mark.parametrize("body, line, words", [
    ("a,b,c\n0,1,1\n", 1, "header"),
    ("", 1, "header"),
    (HEADER, None, "no request"),
    (HEADER + "0,1,1\n1,2\n", 3, "3 comma-separated"),
    (HEADER + "0,1,1\nx,2,2\n", 3, "arrival_s='x'"),
    (HEADER + "0,1,1\n1,2.5,2\n", 3, "prompt_tokens='2.5'"),
    (HEADER + "0,1,1\n1,2,0\n", 3, "output_tokens='0' must be >= 1"),
    (HEADER + "0,1,1\n1,-4,3\n", 3, "prompt_tokens='-4' must be >= 1"),
    (HEADER + "0,1,1\n-1,2,3\n", 3, "finite number >= 0"),
    (HEADER + "0,1,1\nnan,2,3\n", 3, "finite number >= 0"),
    (HEADER + "0,1,1\n5,1,1\n4,1,1\n", 4, "sorted by arrival"),
])
def test_load_trace_errors_name_file_and_line(tmp_path, body, line, words):
    p = _write(tmp_path, body, "bad.csv")
    with pytest.raises(ValueError) as exc:
        traces.load_trace(p)
    msg = str(exc.value)
    assert "bad.csv" in msg and words in msg
    if line is not None:
        assert f"line {line}:" in msg


def test_resolve_trace_names_and_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("KV_REPLAY_TRACES", str(tmp_path))
    _write(tmp_path, HEADER + "0,1,1\n", "mine.csv")
    assert traces.resolve_trace("mine") == tmp_path / "mine.csv"
    assert traces.resolve_trace("mine.csv") == tmp_path / "mine.csv"
    assert traces.resolve_trace(None) == traces.EMBEDDED_TRACE
    with pytest.raises(ValueError, match="trace 'nope'.*mine"):
        traces.resolve_trace("nope")
    with pytest.raises(TypeError, match="trace"):
        traces.resolve_trace(3)


def test_embedded_slice_is_a_prefix_of_the_real_trace():
    t = traces.load_trace()
    assert t.name == "azure_conv_2023_slice"
    assert len(t) > 100 and t.arrival_s[0] == 0.0
    full = traces.available_traces().get("azure_conv_2023")
    if full is None:
        pytest.skip("the shared traces are not beside this checkout")
    f = traces.load_trace(full)
    n = len(t)
    np.testing.assert_allclose(f.arrival_s[:n], t.arrival_s, atol=1e-6)
    np.testing.assert_array_equal(f.prompt_tokens[:n], t.prompt_tokens)
    np.testing.assert_array_equal(f.output_tokens[:n], t.output_tokens)
    assert f.arrival_s[n] > t.arrival_s[-1]   # a prefix in time, not a row sample


def test_time_slice_and_head(tmp_path):
    p = _write(tmp_path, HEADER + "0,1,1\n1,2,2\n2,3,3\n3,4,4\n")
    t = traces.load_trace(p)
    s = t.time_slice(1, 3)
    np.testing.assert_allclose(s.arrival_s, [0.0, 1.0])      # re-based
    np.testing.assert_array_equal(s.prompt_tokens, [2, 3])
    np.testing.assert_allclose(t.time_slice(1, 3, rebase=False).arrival_s, [1.0, 2.0])
    assert len(t.head(2)) == 2 and t.head(10) is t
    with pytest.raises(ValueError, match="end_s"):
        t.time_slice(2, 1)
    with pytest.raises(ValueError, match="holds no request"):
        t.time_slice(10, 20)
    with pytest.raises(ValueError, match="start_s"):
        t.time_slice(-1, 2)


# ------------------------------------------------------------------------------ report
def _run(**kw):
    base = dict(policy="p", t_s=[0.0, 2.0, 5.0], mapped_bytes=[4, 8, 2],
                live_bytes=[2, 2, 1], start_s=0.0, end_s=10.0,
                arrival_s=[0.0, 1.0, 2.0], first_token_s=[0.5, 3.0, np.nan],
                finish_s=[2.5, 7.0, np.nan], output_tokens=[6, 5, 9],
                counters={"map_calls": 3, "unmap_calls": 1, "compaction_bytes": 1 << 30,
                          "time_map_s": 0.01, "time_unmap_s": 0.02, "time_compact_s": 0.07})
    base.update(kw)
    return report.RunRecord(**base)


def test_time_average_is_a_step_integral():
    # 4 on [0,2), 8 on [2,5), 2 on [5,10): (8 + 24 + 10) / 10
    assert report.time_average([0, 2, 5], [4, 8, 2], 10) == pytest.approx(4.2)
    # A start before the first sample counts 0 there: (0*1 + 3*1) / 2
    assert report.time_average([1], [3], 2, start_s=0) == pytest.approx(1.5)


def test_time_weighted_quantile():
    # value 1 for 98 s, value 5 for 1 s, value 9 for 1 s: p99 is 5, p50 is 1, p100 is 9
    v, w = [9, 1, 5], [1, 98, 1]
    assert report.time_weighted_quantile(v, w, 0.99) == 5
    assert report.time_weighted_quantile(v, w, 0.5) == 1
    assert report.time_weighted_quantile(v, w, 1.0) == 9
    assert math.isnan(report.time_weighted_quantile([1], [0], 0.5))
    with pytest.raises(ValueError, match="q"):
        report.time_weighted_quantile(v, w, 1.5)


def test_summarize_hand_computed():
    s = report.summarize(_run())
    gib = float(1 << 30)
    assert s["mapped_avg_gib"] * gib == pytest.approx(4.2)
    assert s["mapped_peak_gib"] * gib == pytest.approx(8)
    # live: 2*2 + 2*3 + 1*5 = 15 over 10 s
    assert s["live_avg_gib"] * gib == pytest.approx(1.5)
    assert s["mapped_to_live_avg"] == pytest.approx(4.2 / 1.5)
    # ratio: 2 for 2 s, 4 for 3 s, 2 for 5 s -> p99 (time-weighted) is 4
    assert s["mapped_to_live_p99"] == pytest.approx(4.0)
    assert s["ttft_p50_s"] == pytest.approx(1.25)            # TTFTs 0.5 and 2.0
    assert s["ttft_mean_s"] == pytest.approx(1.25)
    # TPOT: (2.5-0.5)/5 = 0.4 and (7-3)/4 = 1.0
    assert s["tpot_mean_s"] == pytest.approx(0.7)
    assert s["tpot_p99_s"] == pytest.approx(0.4 + 0.99 * 0.6)
    assert s["requests_finished"] == 2
    assert s["throughput_tok_s"] == pytest.approx(11 / 10)
    assert s["map_calls"] == 3 and s["unmap_calls"] == 1
    assert s["compaction_gib"] == pytest.approx(1.0)
    assert s["arena_time_frac"] == pytest.approx(0.1 / 10)


def test_summarize_used_bytes_optional():
    assert report.summarize(_run())["used_avg_gib"] is None
    s = report.summarize(_run(used_bytes=[3, 3, 1]))        # 6 + 9 + 5 over 10 s
    assert s["used_avg_gib"] * float(1 << 30) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="used_bytes"):
        _run(used_bytes=[1, 2])


def test_summarize_ratio_ignores_empty_time():
    r = _run(t_s=[0.0, 4.0], mapped_bytes=[6, 3], live_bytes=[0, 1], end_s=5.0)
    s = report.summarize(r)
    assert s["mapped_to_live_p99"] == pytest.approx(3.0)     # only [4, 5) has live KV
    assert s["mapped_while_empty_s"] == pytest.approx(4.0)


def test_run_record_validates():
    with pytest.raises(ValueError, match="one length"):
        _run(mapped_bytes=[1, 2])
    with pytest.raises(ValueError, match="non-decreasing"):
        _run(t_s=[0.0, 3.0, 2.0])
    with pytest.raises(ValueError, match="enclose"):
        _run(end_s=4.0)


def test_bucket_timeline_preserves_integral_and_peak():
    r = _run()
    b = report.bucket_timeline(r, 4)                         # slices of 2.5 s
    gib = float(1 << 30)
    mapped = np.array(b["mapped_gib"]) * gib
    # [0,2.5): (4*2 + 8*0.5) / 2.5 = 4.8; [2.5,5): 8; [5,7.5): 2; [7.5,10): 2
    np.testing.assert_allclose(mapped, [4.8, 8.0, 2.0, 2.0])
    np.testing.assert_allclose(np.array(b["mapped_max_gib"]) * gib, [8, 8, 2, 2])
    assert np.mean(mapped) == pytest.approx(4.2)


def test_markdown_table_and_json(tmp_path):
    rows = [report.summarize(_run(policy="static")), report.summarize(_run(policy="windowed"))]
    table = report.markdown_table(rows)
    lines = table.splitlines()
    assert lines[0] == "| metric | static | windowed |"
    assert len(lines) == 2 + len(report.METRIC_ROWS)
    assert all(line.count("|") == 4 for line in lines)
    assert "| mapped / live, p99 | 4.000x | 4.000x |" in lines
    p = report.write_json(tmp_path / "r.json", {"policies": rows, "x": float("nan")})
    doc = json.loads(p.read_text())
    assert doc["x"] is None and doc["policies"][0]["policy"] == "static"
    with pytest.raises(ValueError, match="summaries"):
        report.markdown_table([])


def test_plot_memory_writes_png(tmp_path):
    p = report.plot_memory([_run(policy="a"), _run(policy="b")], tmp_path / "m.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ end to end
# No arrival reserve: the tiny traces span 2 s, so half a second of admissions would keep
# nearly everything mapped and no window would shrink (the reserve is tested in the
# scheduler's tests).
TINY = ["--model", "tiny", "--device-memory-gib", "0.25", "--activation-reserve-gib", "0.05",
        "--max-tokens", "256", "--arrival-reserve-s", "0", "--quiet"]


def _tiny_trace(tmp_path, n: int = 40, seed: int = 0, prompt_range=(20, 600)):
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0, 2.0, n))
    prompt = rng.integers(*prompt_range, n)
    output = rng.integers(2, 200, n)
    p = tmp_path / "tiny.csv"
    t = traces.Trace("tiny", str(p), arrival, prompt, output)
    traces.write_trace(t, p)
    return p, t


def test_cli_every_policy_end_to_end(tmp_path, capsys):
    from bench import replay

    path, trace = _tiny_trace(tmp_path)
    out = tmp_path / "out"
    assert replay.main(["--trace", str(path), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "model: tiny" in printed and "| metric | static | on-demand |" in printed

    doc = json.loads((out / "replay.json").read_text())
    assert (out / "memory.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "table.md").read_text()
    # metrics table, the targets table (header, rule, four targets), issue 9's targets at
    # this budget (header, rule, and the regime's rows)
    scarce = doc["scarce_targets"]
    assert md.count("\n|") == 2 + len(report.METRIC_ROWS) + 6 + 2 + len(scarce)
    assert len(doc["targets"]) == 4 and all(isinstance(t["met"], bool) for t in doc["targets"])
    assert {t["regime"] for t in scarce} == {"plentiful"} and len(scarce) == 4
    names = [p["policy"] for p in doc["policies"]]
    assert names == list(replay.ALL_POLICIES)
    assert doc["environment"]["numpy"] and doc["setup"]["model"]["name"] == "tiny"
    keys = {k for _, spec, _ in report.METRIC_ROWS for k in spec.split("|")}
    total_out = int(trace.output_tokens.sum())
    budget = doc["setup"]["kv_budget_gib"]
    for p in doc["policies"]:
        missing = keys - {k for k, v in p.items() if v is not None}
        if p["policy"] in ("static", "on-demand"):
            missing.discard("mispredictions")     # a window-planner notion only
        assert not missing, (p["policy"], missing)
        assert p["requests_finished"] == len(trace) and p["output_tokens"] == total_out
        assert p["mapped_peak_gib"] >= p["mapped_avg_gib"] >= p["live_avg_gib"] > 0
        # blocks held lie between the tokens written and the memory mapped
        assert p["mapped_avg_gib"] >= p["used_avg_gib"] >= p["live_avg_gib"]
        assert p["mapped_peak_gib"] <= budget + 1e-9
        assert p["mapped_to_own_live_avg"] >= 1.0 and p["mapped_to_live_p99"] >= 1.0
        # every policy's mapped / live over the same live KV: static's
        assert p["live_reference"] == "static"
        assert p["mapped_to_live_avg"] == pytest.approx(
            p["mapped_avg_gib"] / doc["policies"][0]["live_avg_gib"])
        for key in ("policy", "mapped_avg_gib", "live_avg_gib", "arena_time_frac",
                    "arena_total_time_frac", "map_calls", "preemptions", "throughput_tok_s",
                    "tpot_p50_s", "tpot_p99_s", "ttft_p99_s", "recomputed_tokens",
                    "swapped_tokens"):
            assert p[key] is not None, key
        assert p["arena_total_time_frac"] >= p["arena_time_frac"]
        assert 0 < p["ttft_p50_s"] <= p["ttft_p99_s"] and 0 < p["tpot_p50_s"] <= p["tpot_p99_s"]
        assert p["arena_time_frac"] >= 0
        tl = doc["timelines"][p["policy"]]
        assert len(tl["t_s"]) == len(tl["mapped_gib"]) == len(tl["live_gib"])
    by = {p["policy"]: p for p in doc["policies"]}
    static = by["static"]
    # static maps its whole reservation at start and never gives anything back
    assert static["unmap_calls"] == 0 and static["compaction_gib"] == 0
    assert static["mispredictions"] is None and by["windowed:empirical"]["mispredictions"] >= 0
    # (the reservation's modeled map time at start is the only time it holds less)
    assert static["mapped_avg_gib"] == pytest.approx(static["mapped_peak_gib"], rel=0.02)
    assert static["mapped_peak_gib"] == pytest.approx(budget, rel=0.02)
    tl = doc["timelines"]["static"]
    assert min(tl["mapped_max_gib"]) == max(tl["mapped_max_gib"])     # rounded to 1e-4 GiB
    assert max(tl["mapped_max_gib"]) == pytest.approx(static["mapped_peak_gib"], abs=1e-4)
    # on-demand never compacts; the windowed policies give memory back by compaction
    assert by["on-demand"]["compaction_gib"] == 0 and by["on-demand"]["unmap_calls"] > 0
    for name in ("windowed:max_tokens", "windowed:empirical", "windowed:oracle"):
        assert by[name]["mapped_avg_gib"] < static["mapped_avg_gib"]
        assert by[name]["counters"]["shrinks"] > 0
    # with the truth, the plan never under-reserves the decode window (budgets are not
    # mapped, so with plentiful memory the two may map exactly alike)
    oracle, bound = by["windowed:oracle"], by["windowed:max_tokens"]
    assert oracle["mapped_to_live_avg"] <= bound["mapped_to_live_avg"] * (1 + 1e-9)


def test_run_policy_timeline_and_copy_free_compaction_agree(tmp_path):
    """The host replay's table-only compaction makes the same decisions as the real kernel
    that copies bytes, and static's mapped memory is constant after start."""
    from bench import replay

    # long prompts: the tiny model's 2 MiB chunk holds 2048 tokens, compaction needs several
    _, trace = _tiny_trace(tmp_path, n=12, seed=3, prompt_range=(1000, 4000))
    kw = dict(model="tiny", device_memory_gib=0.25, activation_reserve_gib=0.05, max_tokens=256)
    from scheduler.planner import PlannerConfig
    planner = PlannerConfig(arrival_reserve_s=0.0)   # see TINY
    fast = replay.run_policy(replay.build_setup(**kw), trace, "windowed:oracle", progress=False,
                             planner=planner)
    real = replay.run_policy(replay.build_setup(copy_kv_bytes=True, **kw), trace,
                             "windowed:oracle", progress=False, planner=planner)
    assert fast.counters["compaction_moves"] > 0
    np.testing.assert_array_equal(fast.mapped_bytes, real.mapped_bytes)
    np.testing.assert_array_equal(fast.finish_s, real.finish_s)
    static = replay.run_policy(replay.build_setup(**kw), trace, "static", progress=False)
    assert np.all(static.mapped_bytes[1:] == static.mapped_bytes.max())
    assert static.mapped_bytes[0] == 0          # the sample before the reservation


@pytest.mark.parametrize("argv, words", [
    (["--policy", "windowed:psychic"], "policy must be one of"),
    (["--model", "gpt-9"], "model must be one of"),
    (["--time-slice", "5"], "--time-slice"),
    (["--time-slice", "9:3"], "--time-slice"),
    (["--max-requests", "0"], "--max-requests"),
    (["--device-memory-gib", "10"], "leaves nothing for KV"),
    (["--trace", "no_such_trace"], "no_such_trace"),
])
def test_cli_rejects_bad_arguments(argv, words, capsys):
    from bench import replay

    with pytest.raises(SystemExit) as exc:
        replay.main([*argv, "--quiet", "--no-plot"])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_policy_expansion():
    from bench import replay

    assert replay.policies_from_args(None, None) == list(replay.ALL_POLICIES)
    assert replay.policies_from_args(["windowed"], ["oracle"]) == ["windowed:oracle"]
    assert replay.policies_from_args(["static", "static,on-demand"], None) == ["static",
                                                                                "on-demand"]
    assert replay.parse_time_slice("10:") == (10.0, None)
    assert replay.parse_time_slice(":60") == (0.0, 60.0)


@pytest.mark.gpu
def test_cli_on_cuda_uses_the_cuda_backend(tmp_path):
    """With CUDA the arena maps real device memory and compaction runs the real kernel."""
    from bench import replay

    path, trace = _tiny_trace(tmp_path, n=16, seed=5, prompt_range=(1000, 4000))
    out = tmp_path / "out"
    assert replay.main(["--trace", str(path), "--out", str(out), "--no-plot",
                        "--policy", "static", "--policy", "windowed:oracle", *TINY]) == 0
    doc = json.loads((out / "replay.json").read_text())
    assert doc["setup"]["arena_backend"].startswith("cuda")
    for p in doc["policies"]:
        assert p["requests_finished"] == len(trace)
        assert p["mapped_peak_gib"] >= p["mapped_avg_gib"] >= p["live_avg_gib"] > 0


def test_modeled_cost_breakdown_splits_each_charge_by_part():
    from scheduler.costs import ArenaOp, ModeledGPUCost

    m = ModeledGPUCost(map_s_per_chunk=1.0, unmap_s_per_chunk=2.0, device_bandwidth=100.0,
                       host_bandwidth=10.0, op_overhead_s=0.5)
    total = {"map": 0.0, "unmap": 0.0, "compact": 0.0, "swap": 0.0}
    for op, cost in ((ArenaOp("resize", 0.0, chunks_mapped=3, chunk_bytes=1), 3.5),
                     (ArenaOp("shrink", 0.0, chunks_unmapped=2, bytes_moved=100), 6.5),
                     (ArenaOp("swap_out", 0.0, bytes_copied=50), 5.5)):
        assert m(op) == pytest.approx(cost)
        parts = m.breakdown(op, m(op))
        assert sum(parts.values()) == pytest.approx(cost)
        for k, v in parts.items():
            total[k] += v
    # the shrink's unmaps count as unmap, its overhead as compaction
    assert total == pytest.approx({"map": 3.5, "unmap": 4.0, "compact": 2.5, "swap": 5.5})


def test_check_targets():
    base = report.summarize(_run(policy="static", counters={"preemptions": 2}))
    # same memory, 1% fewer tokens per second: ratio 2.8x fails, the rest holds
    w = dict(report.summarize(_run(policy="windowed:empirical")))
    w["throughput_tok_s"] = base["throughput_tok_s"] * 0.99
    rows = report.check_targets([base, w])
    assert [r["met"] for r in rows] == [False, True, True, False]   # 2.8x; 0<=2; -1%; 1%
    assert "-1.00%" in rows[2]["measured"]
    w["throughput_tok_s"] = base["throughput_tok_s"] * 0.97
    w["mapped_to_live_avg"] = 1.15
    w["arena_time_frac"] = 0.0099
    assert [r["met"] for r in report.check_targets([base, w])] == [True, True, False, True]
    assert report.check_targets([base]) == []
    assert report.targets_table(rows).count("| NO |") == 2


def test_kv_budget_caps_every_policy_and_makes_them_preempt(tmp_path):
    """--kv-budget-gib: static maps exactly the budget, nothing maps more, and a budget
    far below the trace's live KV makes the policies preempt (the scarce regime)."""
    from bench import replay

    from bench.synth_traces import write_trace

    rng = np.random.default_rng(2)
    # 40 requests at once, 200-650 tokens each (the tiny model's KV: 1 KiB a token)
    trace = traces.Trace("burst", "test", np.zeros(40), rng.integers(100, 400, 40),
                         rng.integers(100, 250, 40))
    path = write_trace(trace, tmp_path / "burst.csv")
    out = tmp_path / "scarce"
    budget = 4 / 1024    # GiB: 2 of the tiny model's 2 MiB chunks, 4k tokens
    assert replay.main(["--trace", str(path), "--out", str(out), "--kv-budget-gib",
                        str(budget), "--policy", "static", "--policy", "on-demand",
                        "--policy", "windowed:empirical", *TINY]) == 0
    doc = json.loads((out / "replay.json").read_text())
    assert doc["setup"]["kv_budget_gib"] == pytest.approx(budget, rel=1e-6)
    assert doc["setup"]["kv_budget_set"] is True
    by = {p["policy"]: p for p in doc["policies"]}
    assert by["static"]["mapped_peak_gib"] == pytest.approx(budget, rel=1e-6)
    for p in doc["policies"]:
        assert p["mapped_peak_gib"] <= budget + 1e-9
        assert p["requests_finished"] == len(trace)
    assert by["on-demand"]["preemptions"] > 0
    assert by["on-demand"]["recomputed_tokens"] + by["on-demand"]["swapped_tokens"] > 0
    assert {t["regime"] for t in doc["scarce_targets"]} == {"scarce"}
    assert "scarce memory" in (out / "table.md").read_text()


@pytest.mark.parametrize("bad", ["0", "-1", "1e6"])
def test_kv_budget_must_fit_the_device(tmp_path, bad):
    from bench import replay

    path, _ = _tiny_trace(tmp_path)
    with pytest.raises(SystemExit) as exc:
        replay.main(["--trace", str(path), "--out", str(tmp_path / "o"), "--kv-budget-gib", bad,
                     *TINY])
    assert exc.value.code == 2


def test_scarce_targets_pick_the_regime_and_compare_with_on_demand():
    def summ(policy, **kw):
        s = dict(policy=policy, preemptions=0, tpot_p50_s=0.01, tpot_p99_s=0.02,
                 throughput_tok_s=100.0, mapped_avg_gib=1.0, arena_time_frac=0.001)
        s.update(kw)
        return s

    st, od = summ("static"), summ("on-demand")
    w = summ("windowed:empirical", mapped_avg_gib=1.01)
    rows = report.check_scarce_targets([st, od, w])
    assert [r["regime"] for r in rows] == ["plentiful"] * 4 and all(r["met"] for r in rows)
    w["mapped_avg_gib"] = 1.03
    assert not report.check_scarce_targets([st, od, w])[0]["met"]
    od["preemptions"] = 10
    w.update(preemptions=5, tpot_p99_s=0.019, throughput_tok_s=99.5)
    rows = report.check_scarce_targets([st, od, w])
    assert [r["regime"] for r in rows] == ["scarce"] * 3 and all(r["met"] for r in rows)
    w["preemptions"] = 6
    assert [r["met"] for r in report.check_scarce_targets([st, od, w])] == [False, True, True]
    assert report.check_scarce_targets([st, w]) == []
