"""Every metric a run reports, defined once: :mod:`scheduler.metrics` records a run and
summarises it with these functions, ``bench/report.py`` renders them.

Memory is a step function of the loop's time: sample ``i`` holds from ``t_s[i]`` until
``t_s[i + 1]`` (the last one until ``end_s``); before the first sample the value counts as
0. Time averages are exact integrals of the step function over ``[start_s, end_s]``
divided by its length, not means of samples.

- time-averaged mapped / live bytes: :func:`time_average`; peak: the largest sample.
- mapped-to-live ratio, time-averaged: time-averaged mapped / time-averaged live;
  p99: :func:`ratio_quantile`, the 99th percentile over time of ``mapped(t) / live(t)``
  weighted by duration, over the time when ``live(t) > 0``; the time mapped-but-empty is
  :func:`mapped_while_empty_s`.
- TTFT (:func:`ttft_s`): first token time - arrival. TPOT (:func:`tpot_s`):
  (finish - first token) / (output tokens - 1), for finished requests with at least two
  output tokens.
- throughput (:func:`throughput_tok_s`): output tokens of finished requests / (end_s -
  start_s).
- percentiles (:func:`percentile`): linear interpolation over the finite values.
"""
from __future__ import annotations

import numpy as np


def step_durations(t_s: np.ndarray, end_s: float) -> np.ndarray:
    """Seconds each sample holds: ``t[i+1] - t[i]``, the last until ``end_s`` (float64 [k])."""
    t_s = np.asarray(t_s, dtype=np.float64)
    return np.diff(np.append(t_s, max(float(end_s), float(t_s[-1]))))


def time_average(t_s: np.ndarray, values: np.ndarray, end_s: float,
                 start_s: float | None = None) -> float:
    """Integral of the step function (``values[i]`` on ``[t_s[i], t_s[i+1])``, the last
    until ``end_s``) over ``[start_s, end_s]``, divided by ``end_s - start_s``.

    ``t_s`` float64 [k] non-decreasing, ``values`` [k]. Before the first sample the value
    counts as 0; ``start_s`` defaults to ``t_s[0]``. Returns the last value when the
    interval has zero length, 0.0 for an empty timeline.
    """
    t_s = np.asarray(t_s, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if t_s.size == 0:
        return 0.0
    start = float(t_s[0]) if start_s is None else float(start_s)
    span = float(end_s) - start
    if span <= 0:
        return float(values[-1])
    return float(np.dot(step_durations(t_s, end_s), values)) / span


def time_weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` where each value counts for its ``weight``
    (seconds): the smallest value v with weight(values <= v) >= q * total weight.
    NaN when the total weight is 0."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    keep = weights > 0
    values, weights = values[keep], weights[keep]
    if values.size == 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    k = int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12), side="left"))
    return float(values[order][min(k, values.size - 1)])


def ratio_quantile(t_s: np.ndarray, mapped: np.ndarray, live: np.ndarray, end_s: float,
                   q: float = 0.99) -> float:
    """The ``q``-quantile over time of ``mapped(t) / live(t)`` while ``live(t) > 0``
    (NaN when nothing ever lived)."""
    mapped = np.asarray(mapped, dtype=np.float64)
    live = np.asarray(live, dtype=np.float64)
    has = live > 0
    dur = step_durations(t_s, end_s)
    return time_weighted_quantile(mapped[has] / live[has], dur[has], q)


def mapped_while_empty_s(t_s: np.ndarray, mapped: np.ndarray, live: np.ndarray,
                         end_s: float) -> float:
    """Seconds during which memory was mapped but no KV was live."""
    mapped = np.asarray(mapped, dtype=np.float64)
    live = np.asarray(live, dtype=np.float64)
    dur = step_durations(t_s, end_s)
    return float(dur[(live <= 0) & (mapped > 0)].sum())


def ttft_s(arrival_s: np.ndarray, first_token_s: np.ndarray) -> np.ndarray:
    """Time to first token per request (float64 [n]; NaN where no token came out)."""
    return np.asarray(first_token_s, np.float64) - np.asarray(arrival_s, np.float64)


def tpot_s(first_token_s: np.ndarray, finish_s: np.ndarray,
           output_tokens: np.ndarray) -> np.ndarray:
    """Time per output token after the first, per request (float64 [n]; NaN for requests
    that did not finish or produced fewer than two tokens)."""
    first = np.asarray(first_token_s, np.float64)
    finish = np.asarray(finish_s, np.float64)
    out = np.asarray(output_tokens, np.int64)
    ok = np.isfinite(first) & np.isfinite(finish) & (out >= 2)
    res = np.full(first.shape, np.nan)
    res[ok] = (finish[ok] - first[ok]) / (out[ok] - 1)
    return res


def throughput_tok_s(output_tokens: np.ndarray, finish_s: np.ndarray, start_s: float,
                     end_s: float) -> float | None:
    """Output tokens of finished requests (finite ``finish_s``) per second of
    ``[start_s, end_s]``; None for an empty interval."""
    span = float(end_s) - float(start_s)
    done = np.isfinite(np.asarray(finish_s, np.float64))
    tokens = int(np.asarray(output_tokens, np.int64)[done].sum())
    return tokens / span if span > 0 else None


def percentile(x: np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation) of the finite values of
    ``x``; None when there are none."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.percentile(x, q)) if x.size else None


def mean(x: np.ndarray) -> float | None:
    """Mean of the finite values of ``x``; None when there are none."""
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def ratio(num: float, den: float) -> float | None:
    """``num / den``, None when ``den`` is not positive."""
    return num / den if den > 0 else None


__all__ = ["step_durations", "time_average", "time_weighted_quantile", "ratio_quantile",
           "mapped_while_empty_s", "ttft_s", "tpot_s", "throughput_tok_s", "percentile",
           "mean", "ratio"]
