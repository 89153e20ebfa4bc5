"""Remaining-length predictors: how many tokens each running request will still generate.

A predictor is any object with

* ``predict(ids, generated, max_tokens) -> int64 [n]`` — remaining tokens per request,
  given int64 ``[n]`` arrays of request ids, tokens generated so far and max_tokens. The
  result must lie in ``[min(1, max_tokens - generated), max_tokens - generated]``; use
  :func:`clamp_remaining` to make sure.
* ``observe_finished(generated, max_tokens) -> None`` — called when a request finishes,
  with the tokens it generated in all.

and optionally (defaults in :class:`PredictorBase`; :data:`PREDICTORS` adds them to an
object that lacks them)

* ``wants_true_lengths`` (False) and ``reveal(req_id, target)`` — only
  :class:`OraclePredictor` ever sees the true output length: it opts in, and the loop then
  reveals each request's target on submission.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .registry import Registry


@runtime_checkable
class RemainingPredictor(Protocol):
    """What the planner and the loop need from a remaining-length predictor."""

    def predict(self, ids: np.ndarray, generated: np.ndarray,
                max_tokens: np.ndarray) -> np.ndarray: ...

    def observe_finished(self, generated: int, max_tokens: int) -> None: ...


class PredictorBase:
    """Defaults of the optional members (see the module docstring)."""

    name = ""
    wants_true_lengths = False

    def reveal(self, req_id: int, target: int) -> None:
        """Told a request's true output length; ignored unless ``wants_true_lengths``."""

    def observe_finished(self, generated: int, max_tokens: int) -> None:
        """Nothing to learn by default."""


class _WithDefaults(PredictorBase):
    """A predictor object that lacks the optional members, given their defaults."""

    def __init__(self, inner: RemainingPredictor) -> None:
        self.inner = inner
        self.name = type(inner).__name__

    def predict(self, ids, generated, max_tokens):
        return self.inner.predict(ids, generated, max_tokens)

    def observe_finished(self, generated: int, max_tokens: int) -> None:
        self.inner.observe_finished(generated, max_tokens)


def clamp_remaining(pred: np.ndarray, generated: np.ndarray,
                    max_tokens: np.ndarray) -> np.ndarray:
    """Clamp predictions into ``[1, max_tokens - generated]`` (0 when nothing is left).

    All arguments int64 ``[n]``; returns int64 ``[n]``.
    """
    cap = np.maximum(max_tokens - generated, 0)
    return np.minimum(np.maximum(pred, 1), cap)


class MaxTokensPredictor(PredictorBase):
    """The safe upper bound: every request runs to ``max_tokens``."""

    name = "max_tokens"

    def predict(self, ids: np.ndarray, generated: np.ndarray,
                max_tokens: np.ndarray) -> np.ndarray:
        """``max_tokens - generated`` (int64 ``[n]``)."""
        return np.maximum(np.asarray(max_tokens, np.int64) - generated, 0)


class EmpiricalPredictor(PredictorBase):
    """A conditional quantile of the output-length distribution, learned online.

    Keeps the output lengths of the last ``window`` finished requests. For a request that
    has generated ``g`` tokens, the lengths seen that exceed ``g`` form the conditional
    distribution of its final length; the prediction is that distribution's ``quantile``
    minus ``g``. With fewer than ``min_samples`` observations, or none longer than ``g``,
    it falls back to ``max_tokens`` (safe). Always capped by ``max_tokens``.
    Vectorised: one ``searchsorted`` over a sorted copy kept up to date lazily.
    """

    name = "empirical"

    def __init__(self, quantile: float = 0.9, *, window: int = 4096,
                 min_samples: int = 16) -> None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be a positive int, got {min_samples!r}")
        self.quantile = float(quantile)
        self.window = window
        self.min_samples = min_samples
        self._ring = np.zeros(window, dtype=np.int64)
        self._n = 0
        self._table = np.zeros(0, dtype=np.int64)
        self._dirty = False

    @property
    def num_samples(self) -> int:
        """Finished requests the predictor holds now (at most ``window``)."""
        return min(self._n, self.window)

    def observe_finished(self, generated: int, max_tokens: int) -> None:
        """Record the final output length of a finished request."""
        if generated < 1:
            raise ValueError(f"generated must be >= 1, got {generated}")
        self._ring[self._n % self.window] = generated
        self._n += 1
        self._dirty = True

    def _rebuild(self) -> None:
        # A lookup table over every possible `generated` value g = 0 .. max length seen:
        # table[g] = the quantile of the lengths > g (or -1 when none is), so predicting is
        # one gather instead of a binary search per request.
        s = np.sort(self._ring[:self.num_samples])
        n = s.shape[0]
        g = np.arange(int(s[-1]) + 1, dtype=np.int64)
        lo = np.searchsorted(s, g, side="right")  # first length > g
        cnt = n - lo
        # Inverse-CDF quantile of the cnt lengths above g: the ceil(q*cnt)-th of them.
        idx = lo + np.maximum(np.ceil(self.quantile * cnt).astype(np.int64) - 1, 0)
        # Where no length exceeds g, a huge value: min() with the cap then picks max_tokens.
        self._table = np.where(cnt > 0, s[np.minimum(idx, n - 1)], np.int64(2) ** 62)
        self._dirty = False

    def predict(self, ids: np.ndarray, generated: np.ndarray,
                max_tokens: np.ndarray) -> np.ndarray:
        """Remaining tokens per request (int64 ``[n]``), see the class docstring."""
        cap = max_tokens - generated
        if self._n < self.min_samples:
            return np.maximum(cap, 0)
        if self._dirty:
            self._rebuild()
        table = self._table
        pred = table[np.minimum(generated, table.shape[0] - 1)]
        pred -= generated
        np.maximum(pred, 1, out=pred)
        np.minimum(pred, cap, out=pred)
        np.maximum(pred, 0, out=pred)
        return pred


class OraclePredictor(PredictorBase):
    """The truth, for evaluation: remaining = ``target - generated``.

    The loop reveals each request's ``min(output_tokens, max_tokens)`` on submission
    (``wants_true_lengths``). Ids index a dense array, grown as needed.
    """

    name = "oracle"
    wants_true_lengths = True

    def __init__(self, lengths: dict[int, int] | None = None) -> None:
        self._len = np.zeros(0, dtype=np.int64)
        for rid, n in (lengths or {}).items():
            self.reveal(rid, n)

    def reveal(self, req_id: int, target: int) -> None:
        """Tell the oracle that request ``req_id`` generates ``target`` tokens in all."""
        if req_id < 0:
            raise ValueError(f"req_id must be >= 0, got {req_id}")
        if req_id >= self._len.shape[0]:
            grown = np.zeros(max(req_id + 1, 2 * self._len.shape[0]), dtype=np.int64)
            grown[:self._len.shape[0]] = self._len
            self._len = grown
        self._len[req_id] = target

    def predict(self, ids: np.ndarray, generated: np.ndarray,
                max_tokens: np.ndarray) -> np.ndarray:
        """Exact remaining tokens (int64 ``[n]``); unknown ids fall back to max_tokens."""
        ids = np.asarray(ids, dtype=np.int64)
        generated = np.asarray(generated, dtype=np.int64)
        max_tokens = np.asarray(max_tokens, dtype=np.int64)
        known = ids < self._len.shape[0]
        target = np.where(known, self._len[np.where(known, ids, 0)] if self._len.size
                          else 0, 0)
        target = np.where(target > 0, target, max_tokens)
        return np.maximum(np.minimum(target, max_tokens) - generated, 0)


def _with_defaults(p: RemainingPredictor) -> RemainingPredictor:
    return p if isinstance(p, PredictorBase) else _WithDefaults(p)


#: Predictors by name; an object with ``predict`` and ``observe_finished`` is accepted
#: (given the optional members' defaults when it lacks them).
PREDICTORS: Registry[RemainingPredictor] = Registry(
    "predictor", {"max_tokens": MaxTokensPredictor, "empirical": EmpiricalPredictor,
                  "oracle": OraclePredictor},
    accepts=lambda p: isinstance(p, RemainingPredictor), adapt=_with_defaults)


def make_predictor(spec) -> RemainingPredictor:
    """A predictor from a name in :data:`PREDICTORS` or an object that already is one."""
    return PREDICTORS.resolve(spec)
