"""The window planner: plain data in, plain data out, no device.

Given the running prefill and decode sets, the waiting queue (as
:class:`~scheduler.request.RequestSet` arrays) and what the arena can supply
(:class:`ArenaState`), :meth:`WindowPlanner.plan` returns a :class:`Plan`:

* **windows** — prefill: the predicted duration of the prefill batch in flight (all the
  prompt tokens the prefill set still has, in chunks of ``token_budget`` less one token
  per decode request per step, each step also carrying the decode set); decode: ``k`` steps times the predicted step
  time, ``k`` up to the next predicted change of the running set (the first predicted
  finish, the hand-off of the prefill batch, the next arrival), clipped to
  ``[min_decode_steps, max_decode_steps]``;
* **demands** per pool — static (blocks held) + growth (blocks for the tokens added inside
  the window: the rest of each prompt for prefill; ``min(k, predicted remaining)``
  generated tokens per decode request, plus the decode growth of each prefill request
  from its own hand-off step to the window's end, bounded by its max_tokens), each rounded up to whole blocks
  per request, + a margin (``ceil(margin_fraction * (static + growth)) + margin_blocks``
  for a non-empty pool);
* **the allocation condition** — ``prefill target + decode target <= supply_blocks`` (what
  the pools may lease in all: their leases plus mapped-free blocks plus what the device
  can still map, under the cap). When it fails, margins go first, then decode requests are
  preempted in the victim policy's order until it holds; each victim is swapped or
  recomputed as the preemption mode says. Waiting requests are admitted (a prefix of the
  queue, never by preempting anything) while it still holds;
* **shrink** — at a window end, whether mapped memory exceeds the targets plus the
  arrival reserve (``arrival_reserve_s`` of admissions at the recent rate) by at least
  ``shrink_min_blocks`` (then the loop compacts and unmaps down to targets + reserve).

All block counts are ints in blocks of ``block_size`` tokens.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate, islice
from operator import ge, mul, sub
from typing import NamedTuple

import numpy as np

from .latency import LatencyModel, causal_pairs
from .policies import PREEMPTION_MODES, VICTIM_ORDERS, PreemptionMode, VictimOrder
from .predictor import RemainingPredictor, make_predictor
from .request import RequestSet

_INF = math.inf


@dataclass
class PlannerConfig:
    """Knobs of the planner.

    Fixed by the engine, None = take the engine's (:class:`PlanLimits`; a value set here
    must agree with it): ``block_size`` tokens per block; ``block_bytes`` bytes per block
    (for the swap cost); ``token_budget`` tokens per model step; ``max_prefill_tokens``
    prompt tokens admitted into the prefill batch in flight (a first request is admitted
    even when larger); ``max_running`` sequences running at once; ``victim`` the victim
    order (a name in :data:`~scheduler.policies.VICTIM_ORDERS` or a callable);
    ``preemption`` a :class:`PreemptionMode` or its mode name.

    The planner's own: ``min_decode_steps`` / ``max_decode_steps``
    bound the decode window; ``margin_fraction`` / ``margin_blocks`` the safety margin;
    ``shrink_min_blocks`` the excess that makes a window end shrink (None: one chunk);
    ``arrival_reserve_s``: seconds of admissions, at the recent admission rate, whose
    blocks a shrink keeps mapped (the *reserve*), so the next window's arrivals find memory
    without a map call — each chunk unmapped at one window end and mapped again at the next
    costs two driver calls and buys nothing. Default 0: a constant in seconds is tuned to
    one trace; the loop's background mapper keeps what arrivals take mapped ahead instead,
    learned online (:mod:`scheduler.prefetch`).
    """

    block_size: int | None = None
    block_bytes: int | None = None
    token_budget: int | None = None
    max_prefill_tokens: int | None = None
    max_running: int | None = None
    min_decode_steps: int = 4
    max_decode_steps: int = 256
    margin_fraction: float = 0.02
    margin_blocks: int = 1
    shrink_min_blocks: int | None = None
    arrival_reserve_s: float = 0.0
    victim: str | VictimOrder | None = None
    preemption: PreemptionMode | str | None = None

    def __post_init__(self) -> None:
        for name in LIMIT_FIELDS + ("min_decode_steps", "max_decode_steps"):
            v = getattr(self, name)
            if v is None and name in LIMIT_FIELDS:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_decode_steps < self.min_decode_steps:
            raise ValueError(f"max_decode_steps ({self.max_decode_steps}) must be >= "
                             f"min_decode_steps ({self.min_decode_steps})")
        if not 0 <= self.margin_fraction < 10:
            raise ValueError(f"margin_fraction must be in [0, 10), got {self.margin_fraction}")
        if not isinstance(self.margin_blocks, (int, np.integer)) or self.margin_blocks < 0:
            raise ValueError(f"margin_blocks must be an int >= 0, got {self.margin_blocks!r}")
        if not (isinstance(self.arrival_reserve_s, (int, float))
                and 0 <= self.arrival_reserve_s < math.inf):
            raise ValueError(f"arrival_reserve_s must be a finite number >= 0, got "
                             f"{self.arrival_reserve_s!r}")
        if self.shrink_min_blocks is not None and self.shrink_min_blocks < 0:
            raise ValueError(f"shrink_min_blocks must be >= 0, got {self.shrink_min_blocks}")
        # Checked here, resolved by the planner (names stay names in the config).
        if self.victim is not None:
            VICTIM_ORDERS.check(self.victim)
        if self.preemption is not None:
            PREEMPTION_MODES.check(self.preemption)


#: PlannerConfig fields the engine fixes (see :class:`PlanLimits`).
LIMIT_FIELDS = ("block_size", "block_bytes", "token_budget", "max_prefill_tokens",
                "max_running")


@dataclass(frozen=True)
class PlanLimits:
    """What the engine fixes and the planner obeys: ``block_size`` tokens per block,
    ``block_bytes`` bytes per block, ``token_budget`` tokens per step,
    ``max_prefill_tokens`` prompt tokens in the batch in flight, ``max_running`` sequences.
    The defaults serve a planner used on its own."""

    block_size: int = 16
    block_bytes: int = 1
    token_budget: int = 2048
    max_prefill_tokens: int = 8192
    max_running: int = 256


@dataclass(frozen=True)
class ArenaState:
    """What the arena can give, in blocks.

    ``supply_blocks``: blocks the two pools may lease in all (their current leases plus
    mapped-unleased blocks plus what the device can still map, under the cap);
    ``mapped_blocks``: mapped now; ``blocks_per_chunk``: the mapping granule in blocks.
    """

    supply_blocks: int
    mapped_blocks: int = 0
    blocks_per_chunk: int = 1


@dataclass(frozen=True)
class Demand:
    """A pool's demand for one window, in blocks: ``target = static + growth + margin``."""

    static: int
    growth: int
    margin: int

    @property
    def target(self) -> int:
        """Blocks to lease: static + growth + margin."""
        return self.static + self.growth + self.margin


@dataclass
class Plan:
    """The planner's output (plain data).

    Windows in seconds (``prefill_window_s``, ``decode_window_s``), the decode window in
    steps (``decode_steps``), the prefill batch's steps (``prefill_steps``), the predicted
    decode step time; per-pool :class:`Demand` and block targets; ``admit``: how many
    requests from the head of the waiting queue to admit; ``preempt_ids`` (int64) and
    ``preempt_swap`` (bool, True = swap to host, False = recompute) in victim order;
    ``fits``: whether the allocation condition holds after the preemptions;
    ``shortfall_blocks``: what is still missing when it does not; ``shrink``: compact and
    unmap at this window end; ``reserve_blocks``: blocks above the targets that shrink keeps
    mapped for the next window's admissions; ``remaining``: predicted remaining tokens of
    the decode set (int64, the decode set's order); ``decode_ids`` / ``decode_planned_blocks``:
    the running decode set's ids and the blocks the plan holds for each (held + its growth
    in the window; int64), which a finish gives back.
    """

    prefill_window_s: float
    decode_window_s: float
    decode_steps: int
    prefill_steps: int
    step_time_s: float
    prefill: Demand
    decode: Demand
    prefill_target: int
    decode_target: int
    admit: int
    preempt_ids: np.ndarray
    preempt_swap: np.ndarray
    fits: bool
    shortfall_blocks: int
    shrink: bool
    remaining: np.ndarray = field(repr=False)
    reserve_blocks: int = 0
    decode_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    decode_planned_blocks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64),
                                              repr=False)


#: Up to this many prompts the planner of commit 70e61d2 summed causal pairs in Python order,
#: above it with numpy; :func:`_float_pairs` keeps that order where the order matters.
_SMALL = 8
_sum = np.add.reduce
_min = np.minimum.reduce


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    """``ceil(a / b)`` for non-negative int arrays (int64 out)."""
    return -(-a // b)


# ---------------------------------------------------------------------------- named numbers
class Coefficients(NamedTuple):
    """The latency model's five coefficients (seconds per unit), see
    :mod:`scheduler.latency`: a step costs ``step + prompt_token * tokens + attn_pair *
    pairs + decode_seq * sequences + context_token * context tokens read``."""

    step: float
    prompt_token: float
    attn_pair: float
    decode_seq: float
    context_token: float


class PrefillSums(NamedTuple):
    """A prefill set summed: prompt tokens still to process, their causal attention pairs,
    blocks held, and blocks still to allocate for the rest of the prompts. Sums add up."""

    tokens_left: int
    attn_pairs: float
    blocks_held: int
    blocks_to_come: int

    def __add__(self, other: "PrefillSums") -> "PrefillSums":   # type: ignore[override]
        return PrefillSums(self.tokens_left + other.tokens_left,
                           self.attn_pairs + other.attn_pairs,
                           self.blocks_held + other.blocks_held,
                           self.blocks_to_come + other.blocks_to_come)


class DecodeSet(NamedTuple):
    """A decode set with its predictions: per request (int64 ``[n]``) the K/V tokens,
    blocks held and predicted remaining tokens; summed, the K/V tokens, blocks and the
    earliest predicted finish (in steps; inf for an empty set); ``n`` requests."""

    kv_len: np.ndarray
    blocks: np.ndarray
    remaining: np.ndarray
    kv_tokens: int
    blocks_held: int
    first_finish: float
    n: int


class Window(NamedTuple):
    """Step 1's result. ``k``: decode window in steps; ``prefill_steps`` / ``prefill_s``:
    the prefill batch in flight, in steps and seconds (0 without one); ``step_s``: the
    predicted decode step (the decode set alone); ``prompt_per_step``: prompt tokens a step
    carries (the token budget less one row per decode request, at least 1)."""

    k: int
    prefill_steps: int
    prefill_s: float
    step_s: float
    prompt_per_step: int


@dataclass(slots=True)
class Demands:
    """Step 2's result, both pools, in blocks (see :class:`Demand`). ``decode_growth_each``:
    each decode request's growth (int64 ``[n]``, the decode set's order); ``incoming``:
    decode blocks of prefill requests handed off inside the window."""

    prefill_static: int
    prefill_growth: int
    prefill_margin: int
    decode_static: int
    decode_growth: int
    incoming: int
    decode_margin: int
    decode_growth_each: np.ndarray

    @property
    def target(self) -> int:
        """Both pools' targets together: what the allocation condition compares."""
        return (self.prefill_static + self.prefill_growth + self.prefill_margin
                + self.decode_static + self.decode_growth + self.incoming
                + self.decode_margin)

    def cut_margins(self, blocks: int) -> int:
        """Give up to ``blocks`` of margin back, decode's first; returns what is still
        missing."""
        cut = min(blocks, self.decode_margin)
        self.decode_margin -= cut
        blocks -= cut
        cut = min(blocks, self.prefill_margin)
        self.prefill_margin -= cut
        return blocks - cut


# ---------------------------------------------------------------------------- set sums
#: Prompt sets and admission candidates up to this size are handled as Python lists (one
#: ``tolist`` per field, then plain int arithmetic): below it a dozen numpy calls on tiny
#: arrays cost more than the loop. Larger sets take the numpy path.
_PY_ROWS = 32
#: Causal pairs are summed as exact ints; below this bound their float sum is exact in any
#: order, so it equals the float64 sum numpy or a Python loop would give.
_EXACT = 2 ** 52


def _float_pairs(left: list[int], kv: list[int]) -> float:
    """The causal pairs of prompts with ``left`` tokens after ``kv`` cached ones, summed in
    float64 exactly as the planner always did (Python order up to ``_SMALL`` prompts, numpy
    above): the fallback for sums too large, or inputs too odd, to be summed exactly."""
    if len(left) <= _SMALL:
        pairs = 0.0
        for t, c in zip(left, kv):
            pairs += causal_pairs(t, c)
        return pairs
    return float(_sum(causal_pairs(np.asarray(left, np.int64), np.asarray(kv, np.int64))))


class PromptRows:
    """A prefill set (or the prompts of admitted requests) prepared once per plan.

    In admission order. :attr:`sums` is the set's :class:`PrefillSums`; :meth:`handoff`
    gives the hand-off growth for any window, reusing what does not depend on it (each
    prompt's tokens left and those ahead of it, its prompt blocks, the tokens it may still
    generate). Up to ``_PY_ROWS`` prompts are held as lists of Python ints, more as int64
    arrays.
    """

    __slots__ = ("n", "sums", "_rows", "_monotone", "_arrays")

    def __init__(self, prefill_len, kv_len, blocks, max_tokens, generated,
                 block_size: int) -> None:
        """Lists of ints (each ``[n]``, ``n <= _PY_ROWS``) or int64 arrays (any ``n``)."""
        n = self.n = len(prefill_len)
        self._arrays = self._rows = None
        self._monotone = True
        if isinstance(prefill_len, np.ndarray):
            self._arrays = (prefill_len, kv_len, blocks, max_tokens, generated)
            self.sums = _array_sums(prefill_len, kv_len, blocks, block_size)
            return
        if n == 0:
            self.sums = PrefillSums(0, 0.0, 0, 0)
            return
        bs1 = block_size - 1
        total = sum(prefill_len) - sum(kv_len)
        ahead = list(accumulate(map(sub, prefill_len, kv_len)))   # tokens up to each prompt
        cp = [(p + bs1) // block_size for p in prefill_len]        # each prompt's blocks
        grow = sum([x for x in map(sub, cp, blocks) if x > 0])
        self._rows = (prefill_len, ahead, max_tokens, generated, cp)
        # Hand-off steps grow along the set when no prompt has a negative token count;
        # then the causal pairs, sum((pl - kv) * (kv + (pl - kv + 1) / 2)) = (sum(pl**2 -
        # kv**2) + tokens left) / 2, are exact ints.
        exact = self._monotone = all(map(ge, prefill_len, kv_len)) and min(kv_len) >= 0
        pairs = (sum(map(mul, prefill_len, prefill_len)) - sum(map(mul, kv_len, kv_len))
                 + total) >> 1
        if exact and pairs < _EXACT:
            fpairs = float(pairs)
        else:
            fpairs = _float_pairs(list(map(sub, prefill_len, kv_len)), list(kv_len))
        self.sums = PrefillSums(total, fpairs, sum(blocks), grow)

    @classmethod
    def of(cls, s: RequestSet, block_size: int, n: int | None = None) -> "PromptRows":
        """The first ``n`` (default: all) requests of ``s``."""
        if n is None:
            n = s.ids.shape[0]
        if n == 0:
            return _NO_PROMPTS
        f = (s.prefill_len[:n], s.kv_len[:n], s.blocks[:n], s.max_tokens[:n],
             s.generated[:n])
        if n <= _PY_ROWS:
            f = (f[0].tolist(), f[1].tolist(), f[2].tolist(), f[3].tolist(), f[4].tolist())
        return cls(*f, block_size)

    def handoff(self, k: int, per_step: int, block_size: int, before: int = 0) -> int:
        """New decode blocks of these prompts handed off inside a window of ``k`` steps,
        chunked ``per_step`` prompt tokens a step after ``before`` tokens queued ahead
        (see :func:`handoff_growth`)."""
        if k <= 0 or self.n == 0:
            return 0
        ps = max(int(per_step), 1)
        if self._arrays is not None:
            return _array_handoff(*self._arrays, k, ps, block_size, before)
        prompt, ahead, max_tokens, generated, cp = self._rows
        rows = zip(prompt, ahead, max_tokens, generated, cp)
        if self._monotone:
            # Hand-off steps only grow along the set: the prompts that hand off before
            # step k (those with before + ahead <= (k - 1) * ps) are a prefix.
            rows = islice(rows, bisect_right(ahead, (k - 1) * ps - before) if k > 1 else 0)
        bs1, total = block_size - 1, 0
        for pl, cum, m, g, c in rows:
            h = -(-(before + cum) // ps)              # the step its prompt completes
            steps = k - (h if h > 1 else 1)          # then decoded inside the window
            if steps > 0:
                m -= g + 1                            # ... up to max_tokens
                total += (pl + (steps if m >= steps else m if m > 0 else 0) + bs1
                          ) // block_size - c
        return total


#: The empty prompt set (nothing in it changes after construction, so it is shared).
_NO_PROMPTS = PromptRows((), (), (), (), (), 1)


def _array_sums(pl: np.ndarray, kv: np.ndarray, blocks: np.ndarray,
                block_size: int) -> PrefillSums:
    """:class:`PrefillSums` of a large prompt set (int64 ``[n]`` prompt lengths, K/V
    tokens written and blocks held)."""
    left = pl - kv
    g = pl + (block_size - 1)
    g //= block_size
    g -= blocks
    np.maximum(g, 0, out=g)
    return PrefillSums(int(_sum(left)), float(_sum(causal_pairs(left, kv))),
                       int(_sum(blocks)), int(_sum(g)))


def _array_handoff(pl: np.ndarray, kv: np.ndarray, blocks: np.ndarray, max_tokens: np.ndarray,
                   generated: np.ndarray, k: int, per_step: int, block_size: int,
                   before: int) -> int:
    """:meth:`PromptRows.handoff` of a large prompt set (int64 ``[n]`` arrays;
    ``per_step`` >= 1)."""
    cum = np.cumsum(pl - kv)
    cum += before
    steps = k - np.maximum(_ceil_div(cum, per_step), 1)
    np.maximum(steps, 0, out=steps)
    # Blocks for prefill_len + min(max_tokens - generated - 1, steps) tokens, less the
    # prompt's blocks.
    t = max_tokens - generated
    t -= 1
    np.minimum(t, steps, out=t)
    np.maximum(t, 0, out=t)
    t += pl
    t += block_size - 1
    t //= block_size
    return int(_sum(t)) - int(_sum(_ceil_div(pl, block_size)))


def prefill_sums(pre: RequestSet, block_size: int) -> PrefillSums:
    """:class:`PrefillSums` of a prefill set (or of admitted prompts)."""
    return PromptRows.of(pre, block_size).sums


def decode_set(dec: RequestSet, remaining: np.ndarray) -> DecodeSet:
    """:class:`DecodeSet` of ``dec`` with its predicted ``remaining`` tokens."""
    n = remaining.shape[0]
    if n == 0:
        return DecodeSet(dec.kv_len, dec.blocks, remaining, 0, 0, _INF, 0)
    return DecodeSet(dec.kv_len, dec.blocks, remaining, int(_sum(dec.kv_len)),
                     int(_sum(dec.blocks)), float(_min(remaining)), int(n))


def join_decode(a: DecodeSet, b: DecodeSet) -> DecodeSet:
    """Two decode sets as one (``a``'s requests first)."""
    if b.n == 0:
        return a
    return DecodeSet(np.concatenate((a.kv_len, b.kv_len)), np.concatenate((a.blocks, b.blocks)),
                     np.concatenate((a.remaining, b.remaining)), a.kv_tokens + b.kv_tokens,
                     a.blocks_held + b.blocks_held, min(a.first_finish, b.first_finish),
                     a.n + b.n)


def decode_growth(d: DecodeSet, k: int, block_size: int) -> np.ndarray:
    """Blocks each decode request adds in ``k`` steps: ``max(ceil((kv_len + min(remaining,
    k)) / block_size) - blocks, 0)`` (int64 ``[n]``)."""
    bs = int(block_size)
    if k <= d.first_finish:
        # k never exceeds the first predicted finish unless min_decode_steps holds the
        # window open: then min(remaining, k) is k for every request.
        g = d.kv_len + (k + bs - 1)
    else:
        g = np.minimum(d.remaining, k)
        g += d.kv_len
        g += bs - 1
    if bs & (bs - 1):
        g //= bs
    else:   # a power of two: a shift floors the same and costs a fraction of a division
        g >>= bs.bit_length() - 1
    g -= d.blocks
    np.maximum(g, 0, out=g)
    return g


def handoff_growth(pre: RequestSet, k: int, per_step: int, block_size: int,
                   before: int = 0) -> int:
    """New decode blocks of prefill requests handed off inside a window of ``k`` steps.

    ``pre`` is in the order the loop chunks prompts (admission order), ``per_step`` the
    prompt tokens a step carries (the token budget less the decode rows), ``before`` prompt
    tokens queued ahead of ``pre``. Request ``i`` hands off at step ``h_i = ceil((before +
    its prompt tokens left and those of the requests ahead of it) / per_step)`` and decodes
    ``k - h_i`` steps inside the window, bounded by its max_tokens (not predicted: the
    window ends at the batch's hand-off unless ``min_decode_steps`` holds it open)."""
    if k <= 0 or pre.ids.shape[0] == 0:
        return 0
    return PromptRows.of(pre, block_size).handoff(k, per_step, block_size, before)


class WindowPlanner:
    """Plans one window at a time (see the module docstring).

    ``latency``: a :class:`~scheduler.latency.LatencyModel`; ``predictor``: a
    remaining-length predictor or its name; ``config``: a :class:`PlannerConfig`;
    ``limits`` (:class:`PlanLimits`), ``victim`` and ``preemption``: what the engine fixes
    (default: the config's, else the defaults). ValueError when the config sets one of
    them to something else than the engine's.

    :meth:`plan` follows the design's steps, one method each: :meth:`window` (1),
    :meth:`demand` (2), the allocation condition (3, in :meth:`plan`), :meth:`preempt` (4),
    :meth:`admit` (5) and :meth:`shrink_decision` (6).
    """

    def __init__(self, latency: LatencyModel, predictor: RemainingPredictor | str = "max_tokens",
                 config: PlannerConfig | None = None, *, limits: PlanLimits | None = None,
                 victim: str | VictimOrder | None = None,
                 preemption: PreemptionMode | str | None = None) -> None:
        if not isinstance(latency, LatencyModel):
            raise TypeError(f"latency must be a LatencyModel, got {type(latency).__name__}")
        self.latency = latency
        self.predictor = make_predictor(predictor)
        cfg = self.config = config if config is not None else PlannerConfig()
        if not isinstance(cfg, PlannerConfig):
            raise TypeError(f"config must be a PlannerConfig, got {type(config).__name__}")
        own = {f: getattr(cfg, f) for f in LIMIT_FIELDS if getattr(cfg, f) is not None}
        if limits is None:
            limits = PlanLimits(**own)
        for f, v in own.items():
            if v != getattr(limits, f):
                raise ValueError(f"config.{f}={v} contradicts the engine's {f}="
                                 f"{getattr(limits, f)}; leave it None")
        #: the limits in force
        self.limits = limits
        self.victim = _agree("victim", cfg.victim, victim, VICTIM_ORDERS, "most-recent")
        self.preemption = _agree("preemption", cfg.preemption, preemption, PREEMPTION_MODES,
                                 "auto")

    # ------------------------------------------------------------------ 1. window
    def window(self, ps: PrefillSums, n_prefill: int, d: DecodeSet, coef: Coefficients,
               now_s: float, next_arrival_s: float, k_cap: float = _INF) -> Window:
        """The prefill window (the batch in flight: every prompt token left,
        ``token_budget`` less the decode rows per step, each step also carrying the decode
        set) and the decode
        window ``k``: up to the first predicted finish, the hand-off, or the next arrival,
        clipped to ``[min_decode_steps, max_decode_steps]`` and to ``k_cap``."""
        cfg = self.config
        nd = d.n
        step = coef.step
        if nd:
            step = coef.step + coef.decode_seq * nd + coef.context_token * (d.kv_tokens + nd)
        pre_steps, pre_s, handoff = 0, 0.0, _INF
        # Each step carries one token per decode request first; prompts get the rest.
        per_step = max(self.limits.token_budget - nd, 1)
        if n_prefill:
            pre_steps = max(1, -(-ps.tokens_left // per_step))
            pre_s = (pre_steps * step + coef.prompt_token * ps.tokens_left
                     + coef.attn_pair * ps.attn_pairs)
            handoff = pre_steps
        arrival = _INF
        if math.isfinite(next_arrival_s) and step > 0:
            arrival = max(1.0, math.ceil((next_arrival_s - now_s) / step))
        k = min(d.first_finish, handoff, arrival)
        k = cfg.max_decode_steps if k == _INF else int(
            min(max(k, cfg.min_decode_steps), cfg.max_decode_steps))
        if k_cap != _INF:
            k = min(k, int(k_cap))
        return Window(k, pre_steps, pre_s, step, per_step)

    # ------------------------------------------------------------------ 2. demand
    # ------------------------------------------------------------------ 2. demand
    def demand(self, ps: PrefillSums, n_prefill: int, d: DecodeSet, w: Window,
               growth_each: np.ndarray | None, incoming: int,
               growth_sum: int | None = None) -> Demands:
        """Static + growth + margin per pool for window ``w``; ``growth_each`` (the decode
        set's per-request growth for ``w.k``) and ``incoming`` (:func:`handoff_growth`)
        are computed when None / passed in by the caller, who may reuse them, as it may
        ``growth_sum`` (the sum of ``growth_each``)."""
        if growth_each is None:
            growth_each = (decode_growth(d, w.k, self.limits.block_size) if d.n
                           else d.remaining)
            growth_sum = None
        if growth_sum is None:
            growth_sum = int(_sum(growth_each)) if d.n else 0
        pre_static = ps.blocks_held if n_prefill else 0
        pre_growth = ps.blocks_to_come if n_prefill else 0
        return Demands(pre_static, pre_growth, self._margin(pre_static + pre_growth, n_prefill > 0),
                       d.blocks_held if d.n else 0, growth_sum, incoming,
                       self._margin(d.blocks_held + growth_sum + incoming,
                                    d.n > 0 or incoming > 0),
                       growth_each)

    def _margin(self, blocks: int, nonempty: bool) -> int:
        if not nonempty:
            return 0
        cfg = self.config
        return int(math.ceil(cfg.margin_fraction * blocks)) + int(cfg.margin_blocks)

    # ------------------------------------------------------------------ the plan
    def plan(self, prefill: RequestSet, decode: RequestSet, waiting: RequestSet | None,
             arena: ArenaState, *, now_s: float = 0.0, next_arrival_s: float = _INF,
             window_end: bool = True, admission_rate_blocks_s: float = 0.0) -> Plan:
        """Plan the next window (see the module docstring).

        ``prefill`` / ``decode``: the running sets; ``waiting``: the queue in admission
        order (entries with ``swapped`` resume by swap-in straight into decode, the others
        by a prefill of ``prefill_len`` tokens); ``arena``: the supply; ``now_s`` and
        ``next_arrival_s`` (seconds on the loop's clock) bound the decode window by the
        next arrival; ``window_end``: whether a shrink may be planned now;
        ``admission_rate_blocks_s``: blocks admitted per second lately (sizes the reserve
        a shrink keeps, see :class:`PlannerConfig`).

        The running sets are summed once: the union with the admitted requests adds the
        admitted prompts' sums to them and reuses what its window leaves unchanged.
        """
        bs = int(self.limits.block_size)
        coef = Coefficients(*self.latency.c)
        supply = int(arena.supply_blocks)
        n_pre = prefill.ids.shape[0]
        rows = PromptRows.of(prefill, bs)
        ps = rows.sums
        d = decode_set(decode, self.predictor.predict(decode.ids, decode.generated,
                                                      decode.max_tokens))
        w = self.window(ps, n_pre, d, coef, now_s, next_arrival_s)                  # 1
        dem = self.demand(ps, n_pre, d, w, None,
                          rows.handoff(w.k, w.prompt_per_step, bs))                 # 2
        deficit = dem.target - supply                                               # 3
        n_decode = d.n
        admit = 0
        preempt = swap = planned = None
        shortfall = 0
        if deficit <= 0 and waiting is not None and waiting.ids.shape[0]:
            admit, cand = self._admission(waiting, n_pre, ps, d, w, dem, -deficit)   # 5
            if admit:
                w, dem, n_decode = self._with_admitted(rows, ps, d, w, dem, waiting, admit,
                                                       cand, coef, now_s, next_arrival_s)
                over = dem.target - supply
                if over > 0:   # rounding of margins only
                    dem.cut_margins(over)
        elif deficit > 0:
            preempt, swap, shortfall, planned = self._preempt(decode, d, dem, deficit)  # 4
        if preempt is None:
            preempt, swap = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        plan = self._finish(w, n_decode, d.remaining, dem, admit, preempt, swap, shortfall,
                            arena, window_end, admission_rate_blocks_s, coef)
        nd = decode.ids.shape[0]
        if nd:
            plan.decode_ids = decode.ids
            plan.decode_planned_blocks = (planned if planned is not None else
                                          decode.blocks + dem.decode_growth_each[:nd])
        return plan

    # ------------------------------------------------------------------ 4. preemption
    def preempt(self, decode: RequestSet, d: DecodeSet, dem: Demands,
                deficit: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The allocation condition fails by ``deficit`` blocks: margins go first, then
        decode requests in victim order (each frees its blocks and its growth) until it
        holds, then the hand-off growth, then the prefill growth. Updates ``dem``; returns
        ``(victim ids, swap flags, shortfall)``."""
        preempt, swap, shortfall, _ = self._preempt(decode, d, dem, deficit)
        if preempt is None:
            preempt, swap = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        return preempt, swap, shortfall

    def _preempt(self, decode: RequestSet, d: DecodeSet, dem: Demands, deficit: int):
        """:meth:`preempt`, plus each decode request's planned blocks (held + growth,
        int64 ``[n]``) when it computed them, else None; no victims: None, None."""
        preempt = swap = planned = None
        deficit = dem.cut_margins(deficit)
        if deficit > 0 and d.n:
            order = np.asarray(self.victim(decode, d.remaining), dtype=np.int64)
            planned = decode.blocks + dem.decode_growth_each
            freed = np.cumsum(planned[order])
            nv = min(int(np.searchsorted(freed, deficit, side="left")) + 1, d.n)
            victims = order[:nv]
            gone = int(freed[nv - 1])
            deficit -= gone
            kv, held = decode.kv_len[victims], decode.blocks[victims]
            gone_static = int(_sum(held))
            dem.decode_static -= gone_static
            dem.decode_growth -= gone - gone_static     # the victims' growth
            preempt = decode.ids[victims]
            swap = np.asarray(self.preemption(kv, held, self.limits.block_bytes, self.latency),
                              dtype=bool)
        if deficit > 0 and dem.incoming:
            cut = min(deficit, dem.incoming)
            dem.incoming -= cut
            deficit -= cut
        shortfall = 0
        if deficit > 0:
            # Even with no decode set the prefill batch is short: prefill gets what is
            # left (never less than it holds) and the shortfall is reported.
            dem.prefill_growth -= min(deficit, dem.prefill_growth)
            shortfall = deficit
        return preempt, swap, shortfall, planned

    # ------------------------------------------------------------------ 5. admission
    def admit(self, waiting: RequestSet, n_prefill: int, ps: PrefillSums, d: DecodeSet,
              w: Window, dem: Demands, leftover: int) -> int:
        """How many requests from the head of ``waiting`` to admit into ``leftover`` blocks.

        Each candidate is charged an upper bound of what it adds to the union's demand, so
        the plan recomputed on the union (with k no larger) still fits: blocks for its
        prompt (or, swapped, its KV) plus its decode growth for the steps it can decode
        inside the window, plus its margin share; the first entrant of an empty pool pays
        that pool's ``margin_blocks``.
        """
        return self._admission(waiting, n_prefill, ps, d, w, dem, leftover)[0]

    def _admission(self, waiting: RequestSet, n_prefill: int, ps: PrefillSums, d: DecodeSet,
                   w: Window, dem: Demands, leftover: int
                   ) -> tuple[int, tuple[list[bool], list[int]] | None]:
        """:meth:`admit`, plus the head of the queue's swapped flags and prompt lengths as
        lists (None when the candidates were priced as arrays), which the union reuses."""
        lim = self.limits
        room = lim.max_running - d.n - n_prefill
        if room <= 0:
            return 0, None
        # The token budget of the batch in flight first (an empty batch always takes one):
        # it usually leaves a handful of candidates to price. Scanned in Python over the
        # head of the queue; when more than _PY_ROWS candidates fit, numpy prices them.
        limit = lim.max_prefill_tokens - ps.tokens_left
        head = min(room, waiting.ids.shape[0], _PY_ROWS + 1)
        sw = waiting.swapped[:head].tolist()
        pl = waiting.prefill_len[:head].tolist()
        toks, cum = [], 0
        for s, p in zip(sw, pl):
            if not s:
                cum += p
            if cum > limit:
                break
            toks.append(cum)
        n = len(toks)
        if n > _PY_ROWS:
            return self._admission_arrays(waiting, room, n_prefill, ps, d, w, dem, leftover)
        if n == 0:
            if n_prefill:
                return 0, None
            n, toks = 1, [cum]
        return self._price(waiting, n, sw[:n], pl[:n], toks, n_prefill, ps, d, w, dem,
                           leftover), (sw, pl)

    def _price(self, waiting: RequestSet, n: int, sw: list[bool], pl: list[int],
               toks: list[int], n_prefill: int, ps: PrefillSums, d: DecodeSet, w: Window,
               dem: Demands, leftover: int) -> int:
        """The admission of up to ``n`` head candidates, as Python ints (``toks``: the
        prompt tokens up to each, swapped entries counting none)."""
        cfg, bs = self.config, int(self.limits.block_size)
        bs1, k, pps, mf = bs - 1, w.k, w.prompt_per_step, cfg.margin_fraction
        n_sw = sum(sw)
        # A swapped entry decodes for up to k steps; a prefill entry for the union's
        # window less its hand-off step. Upper bounds of what the recomputed plan counts:
        # the union's window ends by the hand-off of all n candidates (at the fewest prompt
        # tokens per step they can leave) unless min_decode_steps holds it open, and is
        # never longer than k; a candidate hands off no earlier than its prompt, chunked
        # after every prompt token ahead of it at this window's tokens per step.
        before = ps.tokens_left
        slowest = max(pps - n_sw, 1)
        k_union = min(k, max(-(-(before + toks[-1]) // slowest), cfg.min_decode_steps))
        if n_sw:
            rem = np.asarray(self.predictor.predict(waiting.ids[:n], waiting.generated[:n],
                                                    waiting.max_tokens[:n])).tolist()
            kv = waiting.kv_len[:n].tolist()
        bare, cost = [], []
        for i in range(n):
            if sw[i]:
                r = rem[i]
                b = (kv[i] + (r if r < k else k) + bs1) // bs
            else:
                h = -(-(before + toks[i]) // pps)
                steps = k_union - (h if h > 1 else 1)
                b = (pl[i] + (steps if steps > 0 else 0) + bs1) // bs
            bare.append(b)
            cost.append(b + math.ceil(mf * b))
        if n_prefill == 0 and n_sw < n:
            cost[sw.index(False)] += cfg.margin_blocks
        if d.n == 0 and dem.incoming == 0:
            cost[0] += cfg.margin_blocks
        fit = total = 0
        for c in cost:
            total += c
            if total > leftover:
                break
            fit += 1
        if fit == 0 and d.n == 0 and n_prefill == 0 and bare[0] <= leftover:
            fit = 1   # alone on the device: margins must not keep it out forever
        return fit

    def _admission_arrays(self, waiting: RequestSet, room: int, n_prefill: int,
                          ps: PrefillSums, d: DecodeSet, w: Window, dem: Demands,
                          leftover: int) -> tuple[int, None]:
        """:meth:`_admission` when more than ``_PY_ROWS`` candidates fit the token budget:
        the same prices, as arrays."""
        cfg, lim = self.config, self.limits
        bs = lim.block_size
        sw = waiting.swapped[:room]
        toks = np.cumsum(np.where(sw, 0, waiting.prefill_len[:room]))
        n = int(np.searchsorted(toks, lim.max_prefill_tokens - ps.tokens_left, side="right"))
        cand = _take(waiting, n)
        sw = sw[:n]
        any_sw = bool(sw.any())
        ahead = ps.tokens_left + toks[:n]
        slowest = max(w.prompt_per_step - int(sw.sum()), 1)
        k_union = min(w.k, max(-(-int(ahead[-1]) // slowest), cfg.min_decode_steps))
        steps_pre = k_union - np.maximum(_ceil_div(ahead, w.prompt_per_step), 1)
        np.maximum(steps_pre, 0, out=steps_pre)
        if any_sw:
            rem = self.predictor.predict(cand.ids, cand.generated, cand.max_tokens)
            steps = np.where(sw, np.minimum(rem, w.k), steps_pre)
            base = np.where(sw, cand.kv_len, cand.prefill_len)
        else:
            steps, base = steps_pre, cand.prefill_len
        bare = _ceil_div(base + steps, bs)
        cost = bare + np.ceil(cfg.margin_fraction * bare).astype(np.int64)
        if n_prefill == 0 and not (any_sw and sw.all()):
            cost[int(np.argmax(~sw)) if any_sw else 0] += cfg.margin_blocks
        if d.n == 0 and dem.incoming == 0:
            cost[0] += cfg.margin_blocks
        fit = int(np.searchsorted(np.cumsum(cost), leftover, side="right"))
        if fit == 0 and d.n == 0 and n_prefill == 0 and bare[0] <= leftover:
            fit = 1
        return fit, None

    def _with_admitted(self, rows: PromptRows, ps: PrefillSums, d: DecodeSet, w: Window,
                       dem: Demands, waiting: RequestSet, admit: int, cand: tuple | None,
                       coef: Coefficients, now_s: float, next_arrival_s: float
                       ) -> tuple[Window, Demands, int]:
        """Window and demand of the running sets joined by the first ``admit`` waiting
        requests (prompts join the prefill set, swapped ones the decode set); k may only
        get smaller, so every demand stays within what :meth:`admit` counted. The running
        sets' sums are reused: the admitted prompts' sums are added to them, and the decode
        set's per-request growth and the running prompts' hand-off growth are kept where k
        (and the tokens per step) did not change. ``rows``: the running prefill set;
        ``cand``: :meth:`_admission`'s lists. Returns the window, the demands and the size
        of the joined decode set."""
        bs = int(self.limits.block_size)
        sw = cand[0][:admit] if cand is not None else waiting.swapped[:admit].tolist()
        if any(sw):
            new = _take(waiting, admit)
            m = np.asarray(sw, dtype=bool)
            new_pre = PromptRows.of(_mask(new, ~m), bs)
            back = _mask(new, m)
            back.blocks = _ceil_div(back.kv_len, bs)
            d_all = join_decode(d, decode_set(back, self.predictor.predict(
                back.ids, back.generated, back.max_tokens)))
        else:
            new_pre, d_all = PromptRows.of(waiting, bs, admit), d
        n_pre = rows.n + new_pre.n
        ps_all = ps + new_pre.sums if new_pre.n else ps
        w2 = self.window(ps_all, n_pre, d_all, coef, now_s, next_arrival_s, k_cap=w.k)
        same_k = w2.k == w.k
        growth, growth_sum = ((dem.decode_growth_each, dem.decode_growth)
                              if same_k and d_all is d else (None, None))
        # The running prompts are chunked first, the admitted ones after them.
        incoming = (dem.incoming if same_k and w2.prompt_per_step == w.prompt_per_step
                    else rows.handoff(w2.k, w2.prompt_per_step, bs))
        incoming += new_pre.handoff(w2.k, w2.prompt_per_step, bs, ps.tokens_left)
        return w2, self.demand(ps_all, n_pre, d_all, w2, growth, incoming, growth_sum), d_all.n


    def shrink_decision(self, target: int, arena: ArenaState, window_end: bool,
                        admission_rate: float) -> tuple[bool, int]:
        """Whether to compact and unmap at this window end, and the reserve: blocks above
        ``target`` kept mapped for ``arrival_reserve_s`` of admissions at the recent rate.
        Shrink when mapped memory exceeds target + reserve (rounded up to chunks) by at
        least ``shrink_min_blocks``."""
        cfg = self.config
        bpc = max(int(arena.blocks_per_chunk), 1)
        thresh = cfg.shrink_min_blocks if cfg.shrink_min_blocks is not None else bpc
        reserve = 0
        if admission_rate > 0 and cfg.arrival_reserve_s > 0:
            reserve = min(math.ceil(admission_rate * cfg.arrival_reserve_s),
                          max(int(arena.supply_blocks) - target, 0))
        top = -(-(target + reserve) // bpc) * bpc
        return bool(window_end and arena.mapped_blocks - top >= max(thresh, 1)), int(reserve)

    def _finish(self, w: Window, nd: int, remaining: np.ndarray, dem: Demands, admit: int,
                preempt: np.ndarray, swap: np.ndarray, shortfall: int, arena: ArenaState,
                window_end: bool, admission_rate: float, coef: Coefficients) -> Plan:
        k = w.k
        # Each step reads one more token per sequence: price the window at its mid-point.
        decode_window = k * (w.step_s + coef.context_token * nd * (k - 1) * 0.5) if nd else 0.0
        pre = Demand(dem.prefill_static, dem.prefill_growth, dem.prefill_margin)
        dec = Demand(dem.decode_static, dem.decode_growth + dem.incoming, dem.decode_margin)
        t_p, t_d = pre.target, dec.target
        shrink, reserve = self.shrink_decision(t_p + t_d, arena, window_end,
                                               admission_rate)                      # 6
        return Plan(prefill_window_s=float(w.prefill_s), decode_window_s=float(decode_window),
                    decode_steps=int(k), prefill_steps=int(w.prefill_steps),
                    step_time_s=float(w.step_s), prefill=pre, decode=dec,
                    prefill_target=t_p, decode_target=t_d, admit=int(admit),
                    preempt_ids=preempt, preempt_swap=swap, fits=shortfall == 0,
                    shortfall_blocks=int(shortfall), shrink=shrink,
                    reserve_blocks=reserve, remaining=remaining)


def _agree(name, own, engine, registry, default):
    """The engine's ``name`` policy (else the config's, else ``default``), resolved once;
    ValueError when the config names a different one than the engine."""
    if engine is None:
        return registry.resolve(own if own is not None else default)
    resolved = registry.resolve(engine)
    if isinstance(own, str) and isinstance(resolved, PreemptionMode):
        same = own == resolved.mode
    elif isinstance(own, str):
        same = registry.resolve(own) is resolved
    else:
        same = own is None or own is resolved
    if not same:
        raise ValueError(f"config.{name}={own!r} contradicts the engine's {name}")
    return resolved


def _take(s: RequestSet, n: int) -> RequestSet:
    return RequestSet(s.ids[:n], s.kv_len[:n], s.prefill_len[:n], s.generated[:n],
                      s.max_tokens[:n], s.blocks[:n], s.admit_seq[:n], s.swapped[:n])


def _mask(s: RequestSet, m: np.ndarray) -> RequestSet:
    return RequestSet(s.ids[m], s.kv_len[m], s.prefill_len[m], s.generated[m],
                      s.max_tokens[m], s.blocks[m], s.admit_seq[m], s.swapped[m])
