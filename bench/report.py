"""The replay's report: per-policy summaries of recorded runs, a Markdown table, JSON and a
PNG of mapped and live KV memory over time.

Input is a :class:`RunRecord` per policy: plain numpy arrays, whatever engine produced them.
Every metric is defined once, in :mod:`scheduler.measures` (time averages of the memory step
function, mapped/live, TTFT, TPOT, throughput; all in the replay's simulated seconds); this
module only applies those definitions to a record and renders the results. Live bytes are
tokens whose K/V are written x bytes per token; allocated (used) bytes are the blocks
requests hold, which also counts a prompt's blocks from admission on, before chunked
prefill has written them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from scheduler import measures

GIB = float(1 << 30)

#: Counters every run reports (missing ones are recorded as 0 by :func:`summarize`, except
#: ``mispredictions``, which is None for a policy that makes no prediction).
COUNTER_KEYS: tuple[str, ...] = (
    "map_calls", "unmap_calls", "compaction_bytes", "compaction_moves", "preemptions",
    "mispredictions", "time_map_s", "time_unmap_s", "time_compact_s", "time_swap_s",
    "recomputed_tokens", "swap_out_bytes", "time_background_s", "mapper_wait_s",
    "startup_map_s")


@dataclass
class RunRecord:
    """What one policy's replay recorded.

    Timeline (step function, simulated seconds): ``t_s`` float64 [k] non-decreasing,
    ``mapped_bytes`` and ``live_bytes`` int64/float64 [k] (bytes of device memory mapped for
    KV, and bytes of the K/V tokens written so far: tokens x bytes per token, not whole
    blocks). ``start_s``/``end_s``: the replayed interval.
    Requests (one row each, NaN where a request never got there): ``arrival_s``,
    ``first_token_s``, ``finish_s`` float64 [n], ``output_tokens`` int64 [n].
    ``counters``: see :data:`COUNTER_KEYS` (times are modeled device seconds).
    ``info``: anything else worth keeping in the JSON (reservation, predictor, ...).
    ``used_bytes`` (optional, same length as ``t_s``): bytes of blocks allocated to requests
    (live KV rounded up to blocks, plus prompt blocks allocated before their tokens are
    written).
    """

    policy: str
    t_s: np.ndarray
    mapped_bytes: np.ndarray
    live_bytes: np.ndarray
    start_s: float
    end_s: float
    arrival_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    output_tokens: np.ndarray
    counters: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    used_bytes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.t_s = np.asarray(self.t_s, dtype=np.float64)
        self.mapped_bytes = np.asarray(self.mapped_bytes, dtype=np.float64)
        self.live_bytes = np.asarray(self.live_bytes, dtype=np.float64)
        if not (self.t_s.ndim == self.mapped_bytes.ndim == self.live_bytes.ndim == 1):
            raise ValueError("t_s, mapped_bytes and live_bytes must be 1-D")
        if not (self.t_s.shape == self.mapped_bytes.shape == self.live_bytes.shape):
            raise ValueError(f"t_s {self.t_s.shape}, mapped_bytes {self.mapped_bytes.shape} and "
                             f"live_bytes {self.live_bytes.shape} must have one length")
        if self.t_s.size == 0:
            raise ValueError("t_s must hold at least one sample")
        if np.any(np.diff(self.t_s) < 0):
            raise ValueError("t_s must be non-decreasing")
        if not (self.start_s <= self.t_s[0] + 1e-12 and self.end_s >= self.t_s[-1] - 1e-12):
            raise ValueError(f"start_s={self.start_s} and end_s={self.end_s} must enclose the "
                             f"timeline [{self.t_s[0]}, {self.t_s[-1]}]")
        for name in ("arrival_s", "first_token_s", "finish_s"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        self.output_tokens = np.asarray(self.output_tokens, dtype=np.int64)
        if self.used_bytes is not None:
            self.used_bytes = np.asarray(self.used_bytes, dtype=np.float64)
            if self.used_bytes.shape != self.t_s.shape:
                raise ValueError(f"used_bytes {self.used_bytes.shape} must match t_s "
                                 f"{self.t_s.shape}")
        n = self.arrival_s.shape
        if not (self.first_token_s.shape == self.finish_s.shape == self.output_tokens.shape == n):
            raise ValueError("arrival_s, first_token_s, finish_s and output_tokens must have "
                             "one length")


# The definitions, re-exported for readers of this module.
time_average = measures.time_average
time_weighted_quantile = measures.time_weighted_quantile


# ---------------------------------------------------------------------------- metrics
def summarize(run: RunRecord) -> dict[str, Any]:
    """Every reported metric of one run, as a JSON-ready dict (bytes in GiB, times in s).

    Keys: see :data:`METRIC_ROWS` plus the raw counters, request counts and ``info``.
    """
    m = measures
    span = float(run.end_s - run.start_s)
    mapped_avg = m.time_average(run.t_s, run.mapped_bytes, run.end_s, run.start_s)
    live_avg = m.time_average(run.t_s, run.live_bytes, run.end_s, run.start_s)
    ratio_p99 = m.ratio_quantile(run.t_s, run.mapped_bytes, run.live_bytes, run.end_s, 0.99)
    done = np.isfinite(run.finish_s)
    ttft = m.ttft_s(run.arrival_s, run.first_token_s)
    tpot = m.tpot_s(run.first_token_s, run.finish_s, run.output_tokens)
    out_tokens = int(run.output_tokens[done].sum())

    c = {k: float(run.counters.get(k, 0)) for k in COUNTER_KEYS}
    c.update({k: float(v) for k, v in run.counters.items() if k not in c})
    # Critical path: what the step loop waited on (its own driver calls and compactions,
    # plus waits for the background mapper). Total: all driver and compaction time, the
    # background mapper's included (what it costs in CPU, not what the loop waited).
    foreground = c["time_map_s"] + c["time_unmap_s"] + c["time_compact_s"]
    arena_time = foreground + c["mapper_wait_s"]
    arena_total = foreground + c["time_background_s"]
    token_bytes = run.info.get("token_bytes")
    return {
        "policy": run.policy,
        "replayed_s": span,
        "requests": int(run.arrival_s.size),
        "requests_finished": int(done.sum()),
        "mapped_avg_gib": mapped_avg / GIB,
        "mapped_peak_gib": float(run.mapped_bytes.max()) / GIB,
        "live_avg_gib": live_avg / GIB,
        "live_peak_gib": float(run.live_bytes.max()) / GIB,
        "used_avg_gib": None if run.used_bytes is None else
        m.time_average(run.t_s, run.used_bytes, run.end_s, run.start_s) / GIB,
        "mapped_to_live_avg": m.ratio(mapped_avg, live_avg),
        "mapped_to_live_p99": None if math.isnan(ratio_p99) else ratio_p99,
        "mapped_while_empty_s": m.mapped_while_empty_s(run.t_s, run.mapped_bytes,
                                                       run.live_bytes, run.end_s),
        "map_calls": int(c["map_calls"]),
        "unmap_calls": int(c["unmap_calls"]),
        "compaction_gib": c["compaction_bytes"] / GIB,
        "preemptions": int(c["preemptions"]),
        "preemptions_planned": int(c.get("preemptions_planned", 0)),
        "recomputed_tokens": int(c["recomputed_tokens"]),
        # whole blocks go over the link: tokens here include the last block's padding
        "swapped_tokens": (int(c["swap_out_bytes"] // token_bytes) if token_bytes else None),
        "swapped_gib": c["swap_out_bytes"] / GIB,
        # Only a policy that predicts can mispredict: absent counter -> None ("n/a").
        "mispredictions": (int(run.counters["mispredictions"])
                           if run.counters.get("mispredictions") is not None else None),
        "output_tokens": out_tokens,
        "throughput_tok_s": m.throughput_tok_s(run.output_tokens, run.finish_s, run.start_s,
                                               run.end_s),
        "throughput_req_s": m.ratio(int(done.sum()), span),
        "ttft_mean_s": m.mean(ttft), "ttft_p50_s": m.percentile(ttft, 50),
        "ttft_p99_s": m.percentile(ttft, 99),
        "tpot_mean_s": m.mean(tpot), "tpot_p50_s": m.percentile(tpot, 50),
        "tpot_p99_s": m.percentile(tpot, 99),
        "arena_time_s": arena_time,
        "arena_time_frac": m.ratio(arena_time, span),
        "arena_total_time_s": arena_total,
        "arena_total_time_frac": m.ratio(arena_total, span),
        "startup_map_s": c["startup_map_s"],
        "counters": c,
        "info": dict(run.info),
    }


#: Rows of the Markdown table: (label, summary key, format). Formats: "gib", "x", "int",
#: "tok", "s", "ms", "pct".
METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("mapped KV, time avg (GiB)", "mapped_avg_gib", "gib"),
    ("mapped KV, peak (GiB)", "mapped_peak_gib", "gib"),
    ("live KV, time avg (GiB)", "live_avg_gib", "gib"),
    ("allocated blocks, time avg (GiB)", "used_avg_gib", "gib"),
    ("mapped / live, time avg", "mapped_to_live_avg", "x"),
    ("mapped / live, p99", "mapped_to_live_p99", "x"),
    ("map calls", "map_calls", "int"),
    ("unmap calls", "unmap_calls", "int"),
    ("compaction moved (GiB)", "compaction_gib", "gib"),
    ("preemptions", "preemptions", "int"),
    ("  of which planned before a step", "preemptions_planned", "int"),
    ("recomputed / swapped tokens", "recomputed_tokens|swapped_tokens", "int"),
    ("mispredictions", "mispredictions", "int"),
    ("requests finished", "requests_finished", "int"),
    ("throughput (tok/s)", "throughput_tok_s", "tok"),
    ("TTFT p50 / p99 (s)", "ttft_p50_s|ttft_p99_s", "s"),
    ("TPOT p50 / p99 (ms)", "tpot_p50_s|tpot_p99_s", "ms"),
    ("arena time on the step loop (% of replay)", "arena_time_frac", "pct"),
    ("  all driver + compaction time, mapper's too (% of replay)", "arena_total_time_frac",
     "pct"),
    ("start-up mapping before serving (s)", "startup_map_s", "s"),
)


def common_denominator(summaries: Sequence[dict[str, Any]], reference: str = "static") -> None:
    """Put every policy's mapped / live (time average) over the same live KV: the
    ``reference`` policy's on the same trace, so a policy that holds requests longer (more
    live KV) does not look better for it. In place: ``mapped_to_live_avg`` becomes
    ``mapped_avg_gib / reference live_avg_gib``; the policy's own ratio moves to
    ``mapped_to_own_live_avg``; ``live_reference`` names the reference (``"own"`` when the
    reference policy was not replayed, and nothing changes)."""
    by = {s["policy"]: s for s in summaries}
    ref = by.get(reference)
    for s in summaries:
        s["mapped_to_own_live_avg"] = s.get("mapped_to_own_live_avg", s["mapped_to_live_avg"])
        if ref is None:
            s["live_reference"] = "own"
            continue
        s["live_reference"] = reference
        s["live_reference_avg_gib"] = ref["live_avg_gib"]
        s["mapped_to_live_avg"] = measures.ratio(s["mapped_avg_gib"], ref["live_avg_gib"])


def _rel(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def check_scarce_targets(summaries: Sequence[Mapping[str, Any]],
                         policy: str = "windowed:empirical") -> list[dict[str, Any]]:
    """Issue 9's targets for ``policy`` at this budget. The regime is *scarce* when static
    or on-demand preempted, else *plentiful*:

    - plentiful: mapped GiB (time avg) <= 1.02x on-demand's; critical-path arena time <=
      0.3% of replayed time; throughput and TPOT p50 within 1% of static's;
    - scarce: preemptions <= 0.5x on-demand's; TPOT p99 <= on-demand's; throughput >=
      0.99x on-demand's.

    Returns one dict per target (``regime``, ``target``, ``measured``, ``met``); empty
    when ``policy``, static or on-demand is missing."""
    by = {s["policy"]: s for s in summaries}
    if not {policy, "static", "on-demand"} <= set(by):
        return []
    p, st, od = by[policy], by["static"], by["on-demand"]
    scarce = st["preemptions"] > 0 or od["preemptions"] > 0
    rows = []

    def row(target, measured, met):
        rows.append({"regime": "scarce" if scarce else "plentiful", "policy": policy,
                     "target": target,
                     "measured": measured, "met": bool(met)})

    if not scarce:
        r = _rel(p["mapped_avg_gib"], od["mapped_avg_gib"])
        row("mapped GiB <= 1.02x on-demand's", _fmt(r, "x"), r is not None and r <= 1.02)
        f = p["arena_time_frac"]
        row("critical-path arena time <= 0.3%", _fmt(f, "pct"), f is not None and f <= 0.003)
        r = _rel(p["throughput_tok_s"], st["throughput_tok_s"])
        row("throughput within 1% of static's", _fmt(r, "x"), r is not None and r >= 0.99)
        r = _rel(p["tpot_p50_s"], st["tpot_p50_s"])
        row("TPOT p50 within 1% of static's", _fmt(r, "x"),
            r is not None and abs(r - 1) <= 0.01)
    else:
        row("preemptions <= 0.5x on-demand's", f"{p['preemptions']} vs {od['preemptions']}",
            p["preemptions"] <= 0.5 * od["preemptions"])
        row("TPOT p99 <= on-demand's",
            f"{_fmt(p['tpot_p99_s'], 'ms')} vs {_fmt(od['tpot_p99_s'], 'ms')} ms",
            p["tpot_p99_s"] is not None and od["tpot_p99_s"] is not None
            and p["tpot_p99_s"] <= od["tpot_p99_s"])
        r = _rel(p["throughput_tok_s"], od["throughput_tok_s"])
        row("throughput >= 0.99x on-demand's", _fmt(r, "x"), r is not None and r >= 0.99)
    return rows


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "gib":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if kind == "x":
        return f"{value:.3f}x" if value < 100 else f"{value:.0f}x"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "tok":
        return f"{value:,.1f}"
    if kind == "s":
        return f"{value:.3f}"
    if kind == "ms":
        return f"{value * 1e3:.2f}"
    if kind == "pct":
        return f"{value * 100:.3f}%"
    return str(value)


def markdown_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table with one column per policy and one row per metric of
    :data:`METRIC_ROWS` (paired metrics shown as ``a / b``). Returns the text, no trailing
    newline."""
    if not summaries:
        raise ValueError("summaries must hold at least one policy")
    head = "| metric | " + " | ".join(str(s["policy"]) for s in summaries) + " |"
    rule = "|---|" + "---:|" * len(summaries)
    lines = [head, rule]
    for label, key, kind in METRIC_ROWS:
        cells = []
        for s in summaries:
            parts = [_fmt(s.get(k), kind) for k in key.split("|")]
            cells.append(" / ".join(parts))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- timelines
def bucket_timeline(run: RunRecord, buckets: int = 1000) -> dict[str, list[float]]:
    """The run's mapped and live bytes averaged over ``buckets`` equal slices of
    ``[start_s, end_s]`` (exact step-function integrals per slice), plus the per-slice peak
    of mapped bytes. Returns lists (JSON-ready): ``t_s`` (slice starts), ``mapped_gib``,
    ``live_gib``, ``mapped_max_gib``."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    span = run.end_s - run.start_s
    if span <= 0:
        return {"t_s": [run.start_s], "mapped_gib": [run.mapped_bytes[-1] / GIB],
                "live_gib": [run.live_bytes[-1] / GIB],
                "mapped_max_gib": [run.mapped_bytes.max() / GIB]}
    edges = np.linspace(run.start_s, run.end_s, buckets + 1)
    # Integral of a step function up to each edge: cumulative area at the sample times,
    # then the partial segment to the edge.
    t = np.append(run.t_s, run.end_s)

    def integral_at(values: np.ndarray) -> np.ndarray:
        area = np.concatenate(([0.0], np.cumsum(np.diff(t) * values)))
        k = np.clip(np.searchsorted(run.t_s, edges, side="right") - 1, 0, values.size - 1)
        before = edges < run.t_s[0]
        res = area[k] + (edges - run.t_s[k]) * values[k]
        res[before] = 0.0
        return res

    width = np.diff(edges)
    mapped = np.diff(integral_at(run.mapped_bytes)) / width
    live = np.diff(integral_at(run.live_bytes)) / width
    # Peak per slice: the max over the sample holding at its start and the samples inside.
    starts = np.clip(np.searchsorted(run.t_s, edges[:-1], side="right") - 1, 0, None)
    ends = np.maximum(np.searchsorted(run.t_s, edges[1:], side="left"), starts + 1)
    padded = np.append(run.mapped_bytes, -np.inf)      # so an end index may equal k
    peak = np.maximum.reduceat(padded, np.column_stack([starts, ends]).ravel())[::2]
    return {"t_s": edges[:-1].tolist(), "mapped_gib": (mapped / GIB).tolist(),
            "live_gib": (live / GIB).tolist(), "mapped_max_gib": (peak / GIB).tolist()}


def plot_memory(runs: Sequence[RunRecord], path: str | Path, *, title: str = "",
                buckets: int = 2000) -> Path:
    """PNG of mapped (solid) and live (dashed) KV memory in GiB over simulated time, every
    policy on one axis (log scale when the largest mapped figure is over 20x the smallest
    live average, so a static reservation does not flatten the others). Returns the path."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo, hi = math.inf, 0.0
    for i, run in enumerate(runs):
        b = bucket_timeline(run, buckets)
        col = colours[i % len(colours)]
        ax.step(b["t_s"], b["mapped_gib"], where="post", color=col, lw=1.4,
                label=f"{run.policy} mapped")
        ax.step(b["t_s"], b["live_gib"], where="post", color=col, lw=1.0, ls="--",
                label=f"{run.policy} live")
        pos = [v for v in b["live_gib"] if v > 0]
        if pos:
            lo = min(lo, float(np.median(pos)))
        hi = max(hi, max(b["mapped_gib"]))
    if math.isfinite(lo) and hi > 20 * lo:
        ax.set_yscale("log")
        # Idle stretches would pull a log axis down to nothing; keep the busy range in view.
        ax.set_ylim(bottom=lo / 30, top=hi * 1.5)
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("KV memory (GiB)")
    ax.set_title(title or "mapped (solid) and live (dashed) KV memory")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def check_targets(summaries: Sequence[Mapping[str, Any]], policy: str = "windowed:empirical",
                  baseline: str = "static") -> list[dict[str, Any]]:
    """The issue's targets for ``policy`` against ``baseline`` (both policy names present in
    ``summaries``; an empty list when either is missing):

    - mapped / live, time average <= 1.15;
    - preemptions <= the baseline's;
    - throughput (tokens/s) within 2% of the baseline's (not more than 2% lower);
    - modeled time in map, unmap and compaction < 1% of the replayed time.

    Returns one dict per target: ``target`` (text), ``measured`` (text), ``met`` (bool).
    """
    by = {s["policy"]: s for s in summaries}
    if policy not in by or baseline not in by:
        return []
    p, b = by[policy], by[baseline]
    ratio = p["mapped_to_live_avg"]
    thr_p, thr_b = p["throughput_tok_s"], b["throughput_tok_s"]
    rel = (thr_p / thr_b - 1.0) if thr_p is not None and thr_b else None
    frac = p["arena_time_frac"]
    return [
        {"target": f"{policy}: mapped / live (time avg) <= 1.15x",
         "measured": _fmt(ratio, "x"), "met": ratio is not None and ratio <= 1.15},
        {"target": f"{policy}: preemptions <= {baseline}'s",
         "measured": f"{p['preemptions']} vs {b['preemptions']}",
         "met": p["preemptions"] <= b["preemptions"]},
        {"target": f"{policy}: throughput within 2% of {baseline}'s",
         "measured": "n/a" if rel is None else
         f"{rel * 100:+.2f}% ({thr_p:,.1f} vs {thr_b:,.1f} tok/s)",
         "met": rel is not None and rel >= -0.02},
        {"target": f"{policy}: map + unmap + compaction < 1% of replayed time",
         "measured": _fmt(frac, "pct") + f" ({p['arena_time_s']:.1f} s of {p['replayed_s']:.0f} s)",
         "met": frac is not None and frac < 0.01},
    ]


def targets_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`check_targets` rows as a Markdown table (no trailing newline)."""
    lines = ["| target | measured | met |", "|---|---|:---:|"]
    lines += [f"| {r['target']} | {r['measured']} | {'yes' if r['met'] else 'NO'} |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as indented JSON (NaN and infinities become null). Returns the path."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, np.generic):
            return clean(x.item())
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(clean(dict(doc)), indent=2, allow_nan=False)
    # Lists of plain numbers on one line each: a timeline is then a few lines, not thousands.
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?|null)\s+\]",
                  lambda m: "[" + re.sub(r"\s+", " ", m.group(1)).strip() + "]", text)
    path.write_text(text + "\n")
    return path

