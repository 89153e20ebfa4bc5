"""Planning one window for 1,024 running requests (target: at most 100 microseconds).

A pytest-benchmark suite (kept in bench/, so CI does not collect it):

    python -m pytest bench/bench_planner.py --benchmark-only

and a script that prints the median microseconds per plan and writes
``bench/results/planner.json`` (``$OUT/planner.json`` when ``OUT`` is set):

    python -m bench.bench_planner [--baseline OLD.json]

To compare two versions of the planner, run the older one first with ``OUT`` set to a
scratch folder (e.g. from ``git archive <commit> | tar -x -C /tmp/old``), then this one
right after it with ``--baseline`` naming the older run's JSON: its medians are recorded
next to the new ones, so the result file carries its own before/after figures. Both runs
should see the same machine load (the JSON records the 1-minute load average).

Scenarios, each with a warm empirical predictor (4,096 finished lengths) and a latency
model from the llama-3-8b / H100 roofline:

* ``decode``  — 1,024 decode requests, nothing else;
* ``mixed``   — 1,000 decode + 24 prefill requests running, 32 waiting (the admission
  path: two evaluations of the window);
* ``preempt`` — the mixed sets with a supply 20 % short (margins cut, victims chosen,
  swap or recompute decided).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from scheduler.latency import DEVICES, MODELS, LatencyModel
from scheduler.planner import ArenaState, PlannerConfig, WindowPlanner
from scheduler.predictor import EmpiricalPredictor
from scheduler.request import RequestSet

N_RUNNING = 1024


def make_case(name: str, seed: int = 0):
    """``(planner, args, kwargs)`` for one scenario (see the module docstring)."""
    rng = np.random.default_rng(seed)
    model = MODELS["llama-3-8b"]
    lat = LatencyModel.from_hardware(model, DEVICES["h100-sxm"])
    pred = EmpiricalPredictor(0.9)
    for x in rng.lognormal(5.5, 1.0, 4096).astype(np.int64) + 1:
        pred.observe_finished(int(min(x, 4096)), 4096)
    spec_bytes = 16 * model.kv_bytes_per_token
    planner = WindowPlanner(lat, pred, PlannerConfig(
        block_size=16, block_bytes=spec_bytes, token_budget=8192, max_prefill_tokens=16384,
        max_running=N_RUNNING + 64, preemption="auto"))
    nd = N_RUNNING if name == "decode" else N_RUNNING - 24
    prompt = rng.integers(16, 4096, nd)
    gen = rng.integers(1, 1024, nd)
    dec = RequestSet.from_arrays(ids=np.arange(nd), kv_len=prompt + gen - 1, generated=gen,
                                 max_tokens=np.full(nd, 4096), block_size=16,
                                 admit_seq=np.arange(nd))
    empty = RequestSet.empty()
    pre, wait = empty, None
    if name != "decode":
        plen = rng.integers(64, 2048, 24)
        done = (plen * rng.random(24)).astype(np.int64)
        pre = RequestSet.from_arrays(ids=10_000 + np.arange(24), kv_len=done, prefill_len=plen,
                                     max_tokens=np.full(24, 4096), block_size=16,
                                     admit_seq=nd + np.arange(24))
        wlen = rng.integers(64, 2048, 32)
        wait = RequestSet.from_arrays(ids=20_000 + np.arange(32), kv_len=np.zeros(32, np.int64),
                                      prefill_len=wlen, max_tokens=np.full(32, 4096),
                                      blocks=np.zeros(32, np.int64),
                                      admit_seq=np.full(32, -1))
    held = int(dec.blocks.sum() + pre.blocks.sum())
    supply = held * 4 if name != "preempt" else int(held * 0.8)
    arena = ArenaState(supply, held * 2, 1)
    return planner, (pre, dec, wait, arena), {"now_s": 0.0}


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(name: str, *, repeats: int = 2000) -> dict:
    """Median / p10 / p90 microseconds per plan of one scenario (host clock)."""
    planner, args, kw = make_case(name)
    plan = planner.plan(*args, **kw)   # warm caches (the predictor's table)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        planner.plan(*args, **kw)
        times.append(time.perf_counter() - t0)
    us = np.asarray(times) * 1e6
    return dict(scenario=name, running=N_RUNNING, repeats=repeats,
                median_us=float(np.median(us)), p10_us=float(np.percentile(us, 10)),
                p90_us=float(np.percentile(us, 90)), admitted=plan.admit,
                preempted=int(plan.preempt_ids.size), decode_steps=plan.decode_steps)


# ---------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, name):
    planner, args, kw = make_case(name)
    plan = benchmark(planner.plan, *args, **kw)
    assert plan.fits
    return plan


def test_plan_1024_decode(benchmark):
    _bench(benchmark, "decode")


def test_plan_1024_mixed_with_admission(benchmark):
    assert _bench(benchmark, "mixed").admit > 0


def test_plan_1024_preempting(benchmark):
    assert _bench(benchmark, "preempt").preempt_ids.size > 0


def git_commit() -> str | None:
    """The commit of the checked-out code (suffixed ``+dirty`` with local changes), or None
    outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/scheduler"], cwd=here,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def load_baseline(path: str) -> dict:
    """An earlier run's JSON, reduced to what the comparison records: its commit, CPU,
    load, date and the median microseconds per scenario. ValueError if it is not one."""
    try:
        with open(path) as f:
            doc = json.load(f)
        medians = {r["scenario"]: float(r["median_us"]) for r in doc["results"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--baseline {path!r} is not a planner benchmark result: {e}") from e
    return {"commit": doc.get("commit"), "cpu_model": doc.get("cpu_model"),
            "load_avg_1min": doc.get("load_avg_1min"),
            "date_utc": doc.get("environment", {}).get("date_utc"), "median_us": medians}


def main(argv=None) -> int:
    """Print the median microseconds per plan of every scenario; write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5,
                    help="independent rounds; the reported median is their median")
    ap.add_argument("--baseline", metavar="JSON",
                    help="an earlier run's planner.json (e.g. of an older commit, run just "
                         "before this one): its medians are recorded next to these")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be >= 1")
    baseline = None
    if args.baseline is not None:
        try:
            baseline = load_baseline(args.baseline)
        except ValueError as e:
            ap.error(str(e))
    results = []
    for name in ("decode", "mixed", "preempt"):
        rounds = [measure(name, repeats=args.repeats) for _ in range(args.rounds)]
        best = dict(rounds[0])
        best["median_us"] = statistics.median(r["median_us"] for r in rounds)
        best["round_medians_us"] = [r["median_us"] for r in rounds]
        was = baseline["median_us"].get(name) if baseline else None
        if was is not None:
            best["baseline_median_us"] = was
        results.append(best)
        print(f"{name:8s} {N_RUNNING} running: median {best['median_us']:7.1f} us per plan "
              f"(rounds {', '.join(f'{r:.1f}' for r in best['round_medians_us'])}) "
              f"on {cpu_model()}" + (f"; baseline {was:.1f} us" if was is not None else ""))
    from bench._common import write_result

    # The figures depend on the core: record which, and how busy the machine was.
    payload = {"target_us": 100.0, "commit": git_commit(), "cpu_model": cpu_model(),
               "load_avg_1min": os.getloadavg()[0], "results": results}
    if baseline is not None:
        payload["baseline"] = baseline
    path = write_result("planner", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
