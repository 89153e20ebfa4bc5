"""What the loop records, as plain data.

* :class:`Timeline` — one sample at every window boundary, every map or unmap, every
  preemption and (by default) after every model step: loop time (s), mapped bytes,
  leased bytes per pool, used bytes (blocks owned
  by pools) and live bytes (tokens with K/V written x bytes per token), and the number of
  requests prefilling, decoding, waiting and swapped out. :meth:`Timeline.arrays` gives
  numpy arrays.
* :class:`Counters` — map/unmap calls, shrinks, compaction moves and bytes, preemptions by
  kind, lease misses (a request needed a block its pool's lease did not cover: a
  misprediction under the windowed policy), emergency grows, on-demand grows, windows,
  plans, steps, tokens (prompt tokens processed, decode tokens, completed prefills: each
  produced one output token), time in arena operations (as the cost model charged it, and wall).
* :class:`RequestRecord` per finished request: arrival, admission, first token and finish
  times (loop seconds), prompt and generated tokens, preemptions; TTFT and TPOT follow.

:class:`Metrics` bundles them and computes time-averaged and peak mapped bytes,
mapped-to-live ratios and throughput.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from . import measures

#: Why a timeline sample was taken.
EVENT_WINDOW, EVENT_MAP, EVENT_UNMAP, EVENT_PREEMPT, EVENT_START, EVENT_END, EVENT_STEP = range(7)
EVENT_NAMES = ("window", "map", "unmap", "preempt", "start", "end", "step")

TIMELINE_FIELDS = ("t_s", "mapped_bytes", "leased_prefill_bytes", "leased_decode_bytes",
                   "used_bytes", "live_bytes", "n_prefill", "n_decode", "n_waiting",
                   "n_swapped", "event")


class Timeline:
    """Samples of memory and queue state over loop time (see the module docstring)."""

    def __init__(self) -> None:
        self._rows: list[tuple] = []

    def __len__(self) -> int:
        return len(self._rows)

    def append(self, t_s: float, mapped_bytes: int, leased_prefill_bytes: int,
               leased_decode_bytes: int, used_bytes: int, live_bytes: int, n_prefill: int,
               n_decode: int, n_waiting: int, n_swapped: int, event: int) -> None:
        """Add one sample (times in seconds, sizes in bytes, counts of requests)."""
        self._rows.append((t_s, mapped_bytes, leased_prefill_bytes, leased_decode_bytes,
                           used_bytes, live_bytes, n_prefill, n_decode, n_waiting, n_swapped,
                           event))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field as a numpy array (``t_s`` float64, the rest int64), one entry per
        sample, in time order."""
        if not self._rows:
            return {f: np.zeros(0, dtype=np.float64 if f == "t_s" else np.int64)
                    for f in TIMELINE_FIELDS}
        cols = list(zip(*self._rows))
        out = {"t_s": np.asarray(cols[0], dtype=np.float64)}
        for name, col in zip(TIMELINE_FIELDS[1:], cols[1:]):
            out[name] = np.asarray(col, dtype=np.int64)
        return out


@dataclass
class Counters:
    """Event counts and totals of one run (bytes, seconds of loop time unless noted)."""

    map_calls: int = 0
    unmap_calls: int = 0
    shrinks: int = 0
    compaction_moves: int = 0
    compaction_bytes: int = 0
    release_calls: int = 0
    preemptions_swap: int = 0
    preemptions_recompute: int = 0
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    recomputed_tokens: int = 0
    lease_misses: int = 0
    emergency_grows: int = 0
    on_demand_grows: int = 0
    windows: int = 0
    idle_closes: int = 0     # windows closed because the engine went idle (windowed)
    plans: int = 0
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefills_completed: int = 0
    finished: int = 0
    rejected: int = 0
    model_time_s: float = 0.0
    arena_time_s: float = 0.0
    arena_wall_s: float = 0.0
    # arena_time_s split by what it was spent on (scheduler.costs.COST_PARTS)
    time_map_s: float = 0.0
    time_unmap_s: float = 0.0
    time_compact_s: float = 0.0
    time_swap_s: float = 0.0
    time_lease_s: float = 0.0
    plan_wall_s: float = 0.0
    # Background mapper (scheduler.metered): driver seconds spent off the critical path,
    # seconds the loop waited for it, lease raises that had to map on the loop's own
    # thread (misses), and its map/unmap batches.
    preemptions_planned: int = 0   # of the preemptions: decided by a plan before a step
    time_background_s: float = 0.0
    startup_map_s: float = 0.0     # static's mapping before serving (not on any clock)
    mapper_wait_s: float = 0.0
    map_misses: int = 0
    background_maps: int = 0
    background_unmaps: int = 0

    @property
    def preemptions(self) -> int:
        """Preemptions of both kinds."""
        return self.preemptions_swap + self.preemptions_recompute

    def as_dict(self) -> dict:
        """All counters as a plain dict (plus ``preemptions``)."""
        d = asdict(self)
        d["preemptions"] = self.preemptions
        return d


@dataclass
class RequestRecord:
    """One finished request: loop times in seconds, token counts."""

    req_id: int
    arrival_s: float
    admit_s: float
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    generated: int
    preemptions: int

    @property
    def ttft_s(self) -> float:
        """Time to first token (:func:`scheduler.measures.ttft_s`)."""
        return float(measures.ttft_s(np.array([self.arrival_s]),
                                     np.array([self.first_token_s]))[0])

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first (:func:`scheduler.measures.tpot_s`; NaN
        for single-token outputs)."""
        return float(measures.tpot_s(np.array([self.first_token_s]), np.array([self.finish_s]),
                                     np.array([self.generated]))[0])


@dataclass
class Metrics:
    """Everything the loop records (see the module docstring). ``end_s``: loop time of the
    last step; ``token_bytes``: bytes of one token's K/V over all layers."""

    timeline: Timeline = field(default_factory=Timeline)
    counters: Counters = field(default_factory=Counters)
    requests: list[RequestRecord] = field(default_factory=list)
    start_s: float = 0.0
    end_s: float = 0.0
    token_bytes: int = 0

    # ------------------------------------------------------------------ per request
    def request_arrays(self) -> dict[str, np.ndarray]:
        """Per finished request (in finishing order): ``req_id``, ``arrival_s``, ``admit_s``,
        ``first_token_s``, ``finish_s``, ``ttft_s``, ``tpot_s`` (float64, NaN where
        undefined), ``prompt_tokens``, ``generated``, ``preemptions`` (int64)."""
        recs = self.requests
        f = lambda name: np.asarray([getattr(r, name) for r in recs], dtype=np.float64)
        i = lambda name: np.asarray([getattr(r, name) for r in recs], dtype=np.int64)
        first, finish, gen = f("first_token_s"), f("finish_s"), i("generated")
        arrival = f("arrival_s")
        return dict(req_id=i("req_id"), arrival_s=arrival, admit_s=f("admit_s"),
                    first_token_s=first, finish_s=finish,
                    ttft_s=measures.ttft_s(arrival, first),
                    tpot_s=measures.tpot_s(first, finish, gen),
                    prompt_tokens=i("prompt_tokens"), generated=gen,
                    preemptions=i("preemptions"))

    # ------------------------------------------------------------------ memory over time
    # Every definition lives in scheduler.measures (shared with bench/report.py).
    def time_average(self, name: str = "mapped_bytes") -> float:
        """Time-weighted mean of a timeline field over ``[start_s, end_s]``
        (:func:`scheduler.measures.time_average`)."""
        a = self.timeline.arrays()
        return measures.time_average(a["t_s"], a[name], self.end_s, self.start_s)

    def peak(self, name: str = "mapped_bytes") -> int:
        """Largest sampled value of a timeline field."""
        v = self.timeline.arrays()[name]
        return int(v.max()) if v.size else 0

    def mapped_to_live(self) -> float:
        """Time-averaged mapped bytes over time-averaged live bytes (inf if nothing lived)."""
        r = measures.ratio(self.time_average("mapped_bytes"), self.time_average("live_bytes"))
        return math.inf if r is None else r

    def throughput_tokens_per_s(self) -> float:
        """Generated tokens of finished requests per second of loop time
        (:func:`scheduler.measures.throughput_tok_s`)."""
        r = self.request_arrays()
        t = measures.throughput_tok_s(r["generated"], r["finish_s"], self.start_s, self.end_s)
        return 0.0 if t is None else t

    def summary(self) -> dict:
        """A JSON-ready dict: counters, mapped bytes (time average, peak), mapped/live,
        throughput, TTFT and TPOT medians and p99 (seconds; NaN where no request counts)."""
        r = self.request_arrays()

        def q(x, p):
            v = measures.percentile(x, p)
            return math.nan if v is None else v

        return dict(counters=self.counters.as_dict(), start_s=self.start_s, end_s=self.end_s,
                    mapped_bytes_avg=self.time_average("mapped_bytes"),
                    mapped_bytes_peak=self.peak("mapped_bytes"),
                    live_bytes_avg=self.time_average("live_bytes"),
                    mapped_to_live=self.mapped_to_live(),
                    throughput_tokens_per_s=self.throughput_tokens_per_s(),
                    ttft_p50_s=q(r["ttft_s"], 50), ttft_p99_s=q(r["ttft_s"], 99),
                    tpot_p50_s=q(r["tpot_s"], 50), tpot_p99_s=q(r["tpot_s"], 99))
