# A frozen copy of scheduler/planner.py as of commit 70e61d2, for tests only.
#
# Why it exists: the planner was rewritten for speed (fewer numpy calls on small arrays,
# the running sets summed once per plan) on the promise that every Plan it returns is
# identical, field by field, to what the code before the rewrite returned.
# tests/test_planner_equivalence.py checks that promise on random states against this copy.
# Do not edit it to follow later changes of the planner: when a decision changes on
# purpose, delete this file and the equivalence test (or freeze a new copy) in the same
# commit. Relative imports were made absolute; nothing else differs from the original.
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
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from scheduler.latency import LatencyModel, causal_pairs
from scheduler.policies import PREEMPTION_MODES, VICTIM_ORDERS, PreemptionMode, VictimOrder
from scheduler.predictor import RemainingPredictor, make_predictor
from scheduler.request import RequestSet

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
    costs two driver calls and buys nothing.
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
    arrival_reserve_s: float = 0.25
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


_SMALL = 8   # sets up to this size are summed in plain Python (a dozen numpy calls cost more)
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
    earliest predicted finish (in steps; inf for an empty set)."""

    kv_len: np.ndarray
    blocks: np.ndarray
    remaining: np.ndarray
    kv_tokens: int
    blocks_held: int
    first_finish: float

    @property
    def n(self) -> int:
        return int(self.remaining.shape[0])


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
def prefill_sums(pre: RequestSet, block_size: int) -> PrefillSums:
    """:class:`PrefillSums` of a prefill set (or of admitted prompts)."""
    n = pre.ids.shape[0]
    if n == 0:
        return PrefillSums(0, 0.0, 0, 0)
    if n <= _SMALL:
        total = held = grow = 0
        pairs = 0.0
        for pl, kv, b in zip(pre.prefill_len.tolist(), pre.kv_len.tolist(),
                             pre.blocks.tolist()):
            total += pl - kv
            pairs += causal_pairs(pl - kv, kv)
            held += b
            grow += max(-(-pl // block_size) - b, 0)
        return PrefillSums(total, pairs, held, grow)
    left = pre.prefill_len - pre.kv_len
    g = pre.prefill_len + (block_size - 1)
    g //= block_size
    g -= pre.blocks
    np.maximum(g, 0, out=g)
    return PrefillSums(int(_sum(left)), float(_sum(causal_pairs(left, pre.kv_len))),
                       int(_sum(pre.blocks)), int(_sum(g)))


def decode_set(dec: RequestSet, remaining: np.ndarray) -> DecodeSet:
    """:class:`DecodeSet` of ``dec`` with its predicted ``remaining`` tokens."""
    if remaining.shape[0] == 0:
        return DecodeSet(dec.kv_len, dec.blocks, remaining, 0, 0, _INF)
    return DecodeSet(dec.kv_len, dec.blocks, remaining, int(_sum(dec.kv_len)),
                     int(_sum(dec.blocks)), float(_min(remaining)))


def join_decode(a: DecodeSet, b: DecodeSet) -> DecodeSet:
    """Two decode sets as one (``a``'s requests first)."""
    if b.n == 0:
        return a
    return DecodeSet(np.concatenate((a.kv_len, b.kv_len)), np.concatenate((a.blocks, b.blocks)),
                     np.concatenate((a.remaining, b.remaining)), a.kv_tokens + b.kv_tokens,
                     a.blocks_held + b.blocks_held, min(a.first_finish, b.first_finish))


def decode_growth(d: DecodeSet, k: int, block_size: int) -> np.ndarray:
    """Blocks each decode request adds in ``k`` steps: ``max(ceil((kv_len + min(remaining,
    k)) / block_size) - blocks, 0)`` (int64 ``[n]``)."""
    g = np.minimum(d.remaining, k)
    g += d.kv_len
    g += block_size - 1
    g //= block_size
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
    n = pre.ids.shape[0]
    if k <= 0 or n == 0:
        return 0
    bs = block_size
    ps = max(int(per_step), 1)
    if n <= _SMALL:
        total, cum = 0, before
        for pl, kv, m, g in zip(pre.prefill_len.tolist(), pre.kv_len.tolist(),
                                pre.max_tokens.tolist(), pre.generated.tolist()):
            cum += pl - kv
            steps = k - max(-(-cum // ps), 1)
            if steps > 0:
                total += -(-(pl + min(max(m - g - 1, 0), steps)) // bs) - (-(-pl // bs))
        return total
    cum = np.cumsum(pre.prefill_len - pre.kv_len) + before
    steps = k - np.maximum(_ceil_div(cum, ps), 1)
    np.maximum(steps, 0, out=steps)
    # Blocks for prefill_len + min(max_tokens - generated - 1, steps) tokens, less the
    # prompt's blocks.
    t = pre.max_tokens - pre.generated
    t -= 1
    np.minimum(t, steps, out=t)
    np.maximum(t, 0, out=t)
    t += pre.prefill_len
    t += bs - 1
    t //= bs
    return int(_sum(t)) - int(_sum(_ceil_div(pre.prefill_len, bs)))


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
    def demand(self, ps: PrefillSums, n_prefill: int, d: DecodeSet, w: Window,
               growth_each: np.ndarray | None, incoming: int) -> Demands:
        """Static + growth + margin per pool for window ``w``; ``growth_each`` (the decode
        set's per-request growth for ``w.k``) and ``incoming`` (:func:`handoff_growth`)
        are computed when None / passed in by the caller, who may reuse them."""
        if growth_each is None:
            growth_each = (decode_growth(d, w.k, self.limits.block_size) if d.n
                           else d.remaining)
        dec_growth = int(_sum(growth_each)) if d.n else 0
        pre_static = ps.blocks_held if n_prefill else 0
        pre_growth = ps.blocks_to_come if n_prefill else 0
        return Demands(pre_static, pre_growth, self._margin(pre_static + pre_growth, n_prefill > 0),
                       d.blocks_held if d.n else 0, dec_growth, incoming,
                       self._margin(d.blocks_held + dec_growth + incoming,
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
        """
        bs = self.limits.block_size
        coef = Coefficients(*self.latency.c)
        supply = int(arena.supply_blocks)
        n_pre = prefill.ids.shape[0]
        ps = prefill_sums(prefill, bs)
        d = decode_set(decode, self.predictor.predict(decode.ids, decode.generated,
                                                      decode.max_tokens))
        w = self.window(ps, n_pre, d, coef, now_s, next_arrival_s)                  # 1
        dem = self.demand(ps, n_pre, d, w, None,
                          handoff_growth(prefill, w.k, w.prompt_per_step, bs))      # 2
        deficit = dem.target - supply                                               # 3
        n_decode = d.n
        admit = 0
        preempt = np.zeros(0, dtype=np.int64)
        swap = np.zeros(0, dtype=bool)
        shortfall = 0
        if deficit <= 0 and waiting is not None and waiting.ids.shape[0]:
            admit = self.admit(waiting, n_pre, ps, d, w, dem, -deficit)               # 5
            if admit:
                w, dem, n_decode = self._with_admitted(prefill, ps, d, w, dem, waiting, admit,
                                                       coef, now_s, next_arrival_s)
                over = dem.target - supply
                if over > 0:   # rounding of margins only
                    dem.cut_margins(over)
        elif deficit > 0:
            preempt, swap, shortfall = self.preempt(decode, d, dem, deficit)          # 4
        plan = self._finish(w, n_decode, d.remaining, dem, admit, preempt, swap, shortfall,
                            arena, window_end, admission_rate_blocks_s, coef)
        nd = decode.ids.shape[0]
        if nd:
            plan.decode_ids = decode.ids
            plan.decode_planned_blocks = decode.blocks + dem.decode_growth_each[:nd]
        return plan

    # ------------------------------------------------------------------ 4. preemption
    def preempt(self, decode: RequestSet, d: DecodeSet, dem: Demands,
                deficit: int) -> tuple[np.ndarray, np.ndarray, int]:
        """The allocation condition fails by ``deficit`` blocks: margins go first, then
        decode requests in victim order (each frees its blocks and its growth) until it
        holds, then the hand-off growth, then the prefill growth. Updates ``dem``; returns
        ``(victim ids, swap flags, shortfall)``."""
        preempt = np.zeros(0, dtype=np.int64)
        swap = np.zeros(0, dtype=bool)
        deficit = dem.cut_margins(deficit)
        if deficit > 0 and d.n:
            order = np.asarray(self.victim(decode, d.remaining), dtype=np.int64)
            freed = np.cumsum((decode.blocks + dem.decode_growth_each)[order])
            nv = min(int(np.searchsorted(freed, deficit, side="left")) + 1, d.n)
            victims = order[:nv]
            deficit -= int(freed[nv - 1])
            dem.decode_static -= int(decode.blocks[victims].sum())
            dem.decode_growth -= int(dem.decode_growth_each[victims].sum())
            preempt = decode.ids[victims]
            swap = np.asarray(self.preemption(decode.kv_len[victims], decode.blocks[victims],
                                              self.limits.block_bytes, self.latency),
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
        return preempt, swap, shortfall

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
        cfg, lim = self.config, self.limits
        bs = lim.block_size
        room = lim.max_running - d.n - n_prefill
        if room <= 0:
            return 0
        # The token budget of the batch in flight first (an empty batch always takes one):
        # it usually leaves a handful of candidates to price.
        sw = waiting.swapped[:room]
        toks = np.cumsum(np.where(sw, 0, waiting.prefill_len[:room]))
        n = int(np.searchsorted(toks, lim.max_prefill_tokens - ps.tokens_left, side="right"))
        if n == 0 and n_prefill == 0:
            n = 1
        if n == 0:
            return 0
        cand = _take(waiting, n)
        sw = sw[:n]
        # A swapped entry decodes for up to k steps; a prefill entry for the union's
        # window less its hand-off step. Upper bounds of what the recomputed plan counts:
        # the union's window ends by the hand-off of all n candidates (at the fewest prompt
        # tokens per step they can leave) unless min_decode_steps holds it open, and is
        # never longer than k; a candidate hands off no earlier than its prompt, chunked
        # after every prompt token ahead of it at this window's tokens per step.
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
            fit = 1   # alone on the device: margins must not keep it out forever
        return fit

    def _with_admitted(self, prefill: RequestSet, ps: PrefillSums, d: DecodeSet, w: Window,
                       dem: Demands, waiting: RequestSet, admit: int, coef: Coefficients,
                       now_s: float, next_arrival_s: float
                       ) -> tuple[Window, Demands, int]:
        """Window and demand of the running sets joined by the first ``admit`` waiting
        requests (prompts join the prefill set, swapped ones the decode set); k may only
        get smaller, so every demand stays within what :meth:`admit` counted. Sums and
        per-request growth of the running sets are reused where k did not change. Returns
        the window, the demands and the size of the joined decode set."""
        bs = self.limits.block_size
        new = _take(waiting, admit)
        sw = new.swapped
        if sw.any():
            new_pre = _mask(new, ~sw)
            back = _mask(new, sw)
            back.blocks = _ceil_div(back.kv_len, bs)
            d_all = join_decode(d, decode_set(back, self.predictor.predict(
                back.ids, back.generated, back.max_tokens)))
        else:
            new_pre, d_all = new, d
        n_pre = prefill.ids.shape[0] + new_pre.ids.shape[0]
        ps_all = ps + prefill_sums(new_pre, bs) if new_pre.ids.shape[0] else ps
        w2 = self.window(ps_all, n_pre, d_all, coef, now_s, next_arrival_s, k_cap=w.k)
        growth = dem.decode_growth_each if (w2.k == w.k and d_all is d) else None
        # The running prompts are chunked first, the admitted ones after them.
        incoming = (dem.incoming if (w2.k, w2.prompt_per_step) == (w.k, w.prompt_per_step)
                    else handoff_growth(prefill, w2.k, w2.prompt_per_step, bs))
        incoming += handoff_growth(new_pre, w2.k, w2.prompt_per_step, bs, ps.tokens_left)
        return w2, self.demand(ps_all, n_pre, d_all, w2, growth, incoming), d_all.n

    # ------------------------------------------------------------------ 6. shrink
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
