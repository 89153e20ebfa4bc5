"""Synthetic long-prompt, short-output traffic (RAG / summarisation shaped), as trace CSVs.

Issue 9's second workload: prompts around 2k tokens, outputs around 30, about 2.5 requests
a second on average, with idle gaps (the engine sits idle a large share of the time). The
arrivals alternate between *active* periods and *idle* gaps (both exponential in length);
inside an active period requests arrive either as a Poisson process or in bursts (a gamma
renewal process with shape < 1: the same mean rate, inter-arrival times far more uneven).

Lengths are lognormal around the stated medians and clipped to a range. Everything is drawn
from one ``numpy.random.Generator`` seeded by ``seed``, so a trace is reproducible from its
arguments. The CSV has the shared traces' format (``arrival_s,prompt_tokens,output_tokens``,
see :mod:`bench.traces`) and loads with :func:`bench.traces.load_trace`.

    python -m bench.synth_traces --out bench/data/synth --arrival poisson --seed 0
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .traces import TRACE_COLUMNS, Trace

ARRIVALS = ("poisson", "bursty")


@dataclass(frozen=True)
class LongPromptShape:
    """What a synthesized trace looks like.

    ``rate_req_s``: mean requests per second over the whole trace, idle gaps included;
    ``active_s`` / ``idle_s``: mean lengths (s) of active periods and idle gaps (idle_s=0:
    no gaps); ``burst_shape``: gamma shape of inter-arrival times in bursty mode (< 1:
    burstier than Poisson; the squared coefficient of variation is 1 / shape);
    ``prompt_median`` / ``prompt_sigma`` and ``output_median`` / ``output_sigma``: lognormal
    medians (tokens) and log-space sigmas; ``prompt_range`` / ``output_range``: clip ranges
    (tokens, inclusive)."""

    rate_req_s: float = 2.5
    active_s: float = 20.0
    idle_s: float = 12.0
    burst_shape: float = 0.2
    prompt_median: float = 2048.0
    prompt_sigma: float = 0.25
    prompt_range: tuple[int, int] = (256, 8192)
    output_median: float = 30.0
    output_sigma: float = 0.4
    output_range: tuple[int, int] = (2, 256)

    def __post_init__(self) -> None:
        for name in ("rate_req_s", "active_s", "burst_shape", "prompt_median", "output_median"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("idle_s", "prompt_sigma", "output_sigma"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("prompt_range", "output_range"):
            lo, hi = getattr(self, name)
            if not (1 <= lo <= hi):
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")


def synthesize(duration_s: float, arrival: str = "poisson", seed: int = 0,
               shape: LongPromptShape | None = None, name: str | None = None) -> Trace:
    """A long-prompt, short-output trace of about ``duration_s`` seconds.

    ``arrival``: "poisson" or "bursty" inside active periods; ``seed``: the generator's
    seed; ``shape``: a :class:`LongPromptShape` (default: ~2k-token prompts, ~30-token
    outputs, 2.5 req/s with gaps). Returns a :class:`bench.traces.Trace` (float64 arrivals
    in seconds from 0, int64 token counts), at least one request.
    """
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s)
            and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {ARRIVALS}, got {arrival!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    shape = shape if shape is not None else LongPromptShape()
    if not isinstance(shape, LongPromptShape):
        raise TypeError(f"shape must be a LongPromptShape, got {type(shape).__name__}")
    rng = np.random.default_rng(int(seed))
    # The rate inside active periods that gives rate_req_s over active + idle time.
    active_rate = shape.rate_req_s * (shape.active_s + shape.idle_s) / shape.active_s
    times: list[np.ndarray] = []
    t = 0.0
    while t < duration_s:
        span = min(rng.exponential(shape.active_s), duration_s - t)
        n_max = int(active_rate * span * 3) + 16
        if arrival == "poisson":
            gaps = rng.exponential(1.0 / active_rate, n_max)
        else:
            k = shape.burst_shape
            gaps = rng.gamma(k, 1.0 / (active_rate * k), n_max)
        at = t + np.cumsum(gaps)
        times.append(at[at < t + span])
        t += span
        if shape.idle_s > 0:
            t += rng.exponential(shape.idle_s)
    arr = np.concatenate(times) if times else np.zeros(0)
    if arr.size == 0:
        arr = np.zeros(1)
    arr = np.round(arr - arr[0], 6)
    n = arr.size
    prompt = _lognormal(rng, shape.prompt_median, shape.prompt_sigma, shape.prompt_range, n)
    output = _lognormal(rng, shape.output_median, shape.output_sigma, shape.output_range, n)
    label = name or f"long_prompt_{arrival}_s{seed}"
    return Trace(label, f"bench.synth_traces.synthesize(duration_s={duration_s}, "
                        f"arrival={arrival!r}, seed={seed}, shape={shape})",
                 arr.astype(np.float64), prompt, output)


def _lognormal(rng: np.random.Generator, median: float, sigma: float, bounds: tuple[int, int],
               n: int) -> np.ndarray:
    x = np.rint(median * np.exp(sigma * rng.standard_normal(n)))
    return np.clip(x, bounds[0], bounds[1]).astype(np.int64)


def write_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` as a CSV in the shared traces' format; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.write(",".join(TRACE_COLUMNS) + "\n")
        for a, p, o in zip(trace.arrival_s.tolist(), trace.prompt_tokens.tolist(),
                           trace.output_tokens.tolist()):
            f.write(f"{a:.6f},{p},{o}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.synth_traces", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write <name>.csv into")
    ap.add_argument("--arrival", choices=ARRIVALS, nargs="+", default=list(ARRIVALS))
    ap.add_argument("--seed", type=int, nargs="+", default=[0])
    ap.add_argument("--duration-s", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=LongPromptShape.rate_req_s,
                    help="mean requests/s over the trace, gaps included")
    ap.add_argument("--idle-s", type=float, default=LongPromptShape.idle_s,
                    help="mean idle gap (s); 0 for none")
    args = ap.parse_args(argv)
    try:
        shape = LongPromptShape(rate_req_s=args.rate, idle_s=args.idle_s)
        for arrival in args.arrival:
            for seed in args.seed:
                tr = synthesize(args.duration_s, arrival, seed, shape)
                p = write_trace(tr, Path(args.out) / f"{tr.name}.csv")
                d = tr.describe()
                print(f"{p}: {d['requests']} requests over {d['span_s']:.0f} s, "
                      f"prompt p50 {d['prompt_tokens']['p50']:.0f}, "
                      f"output p50 {d['output_tokens']['p50']:.0f}")
    except ValueError as exc:
        ap.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
