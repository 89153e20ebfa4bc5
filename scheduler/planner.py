"""The window planner: plain data in, plain data out, no device.

Given the running prefill and decode sets, the waiting queue (as
:class:`~scheduler.request.RequestSet` arrays) and what the arena can supply
(:class:`ArenaState`), :meth:`WindowPlanner.plan` returns a :class:`Plan`:

* **windows** — prefill: the predicted duration of the prefill batch in flight (all the
  prompt tokens the prefill set still has, in chunks of ``token_budget`` tokens per step,
  each step also carrying the decode set); decode: ``k`` steps times the predicted step
  time, ``k`` up to the next predicted change of the running set (the first predicted
  finish, the hand-off of the prefill batch, the next arrival), clipped to
  ``[min_decode_steps, max_decode_steps]``;
* **demands** per pool — static (blocks held) + growth (blocks for the tokens added inside
  the window: the rest of each prompt for prefill; ``min(k, predicted remaining)``
  generated tokens per decode request, plus the decode growth of prefill requests handed
  off inside the window, bounded by their max_tokens), each rounded up to whole blocks
  per request, + a margin (``ceil(margin_fraction * (static + growth)) + margin_blocks`` for a non-empty pool);
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

import numpy as np

from .latency import LatencyModel
from .policies import PreemptionMode, VictimOrder, victim_order
from .predictor import RemainingPredictor, make_predictor
from .request import RequestSet

_INF = math.inf


@dataclass
class PlannerConfig:
    """Knobs of the planner.

    ``block_size`` tokens per block; ``block_bytes`` bytes per block (for the swap cost);
    ``token_budget`` tokens per model step; ``max_prefill_tokens`` prompt tokens admitted
    into the prefill batch in flight (a first request is admitted even when larger);
    ``max_running`` sequences running at once; ``min_decode_steps`` / ``max_decode_steps``
    bound the decode window; ``margin_fraction`` / ``margin_blocks`` the safety margin;
    ``shrink_min_blocks`` the excess that makes a window end shrink (None: one chunk);
    ``arrival_reserve_s``: seconds of admissions, at the recent admission rate, whose
    blocks a shrink keeps mapped (the *reserve*), so the next window's arrivals find memory
    without a map call — each chunk unmapped at one window end and mapped again at the next
    costs two driver calls and buys nothing;
    ``victim`` the victim order (name or callable, see :mod:`scheduler.policies`);
    ``preemption`` a :class:`PreemptionMode` or its mode name.
    """

    block_size: int = 16
    block_bytes: int = 1
    token_budget: int = 2048
    max_prefill_tokens: int = 8192
    max_running: int = 256
    min_decode_steps: int = 4
    max_decode_steps: int = 256
    margin_fraction: float = 0.02
    margin_blocks: int = 1
    shrink_min_blocks: int | None = None
    arrival_reserve_s: float = 0.25
    victim: str | VictimOrder = "most-recent"
    preemption: PreemptionMode | str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "block_bytes", "token_budget", "max_prefill_tokens",
                     "max_running", "min_decode_steps", "max_decode_steps"):
            v = getattr(self, name)
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
        self.victim = victim_order(self.victim)
        if isinstance(self.preemption, str):
            self.preemption = PreemptionMode(self.preemption)
        elif not callable(self.preemption):
            raise TypeError("preemption must be a PreemptionMode, a mode name or a callable")


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
    the decode set (int64, the decode set's order).
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


_SMALL = 8   # sets up to this size are summed in plain Python
_sum = np.add.reduce
_min = np.minimum.reduce


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    """``ceil(a / b)`` for non-negative int arrays (int64 out)."""
    return -(-a // b)


class WindowPlanner:
    """Plans one window at a time (see the module docstring).

    ``latency``: a :class:`~scheduler.latency.LatencyModel`; ``predictor``: a
    remaining-length predictor or its name; ``config``: a :class:`PlannerConfig`.
    """

    def __init__(self, latency: LatencyModel, predictor: RemainingPredictor | str = "max_tokens",
                 config: PlannerConfig | None = None) -> None:
        if not isinstance(latency, LatencyModel):
            raise TypeError(f"latency must be a LatencyModel, got {type(latency).__name__}")
        self.latency = latency
        self.predictor = make_predictor(predictor)
        self.config = config if config is not None else PlannerConfig()
        if not isinstance(self.config, PlannerConfig):
            raise TypeError(f"config must be a PlannerConfig, got {type(config).__name__}")

    # ------------------------------------------------------------------ pieces
    def _pre_sums(self, pre: RequestSet) -> tuple[int, float, int, int]:
        """Prompt tokens left, attention pairs, blocks held and blocks still needed."""
        n = len(pre)
        if n == 0:
            return 0, 0.0, 0, 0
        bs = self.config.block_size
        if n <= _SMALL:   # a few admitted prompts: plain ints beat a dozen numpy calls
            total = pairs2 = held = grow = 0
            for pl, kv, b in zip(pre.prefill_len.tolist(), pre.kv_len.tolist(),
                                 pre.blocks.tolist()):
                t = pl - kv
                total += t
                pairs2 += t * (2 * kv + t + 1)
                held += b
                grow += max(-(-pl // bs) - b, 0)
            return total, 0.5 * pairs2, held, grow
        left = pre.prefill_len - pre.kv_len
        # Causal pairs of the chunk: sum of left * (2 * kv_len + left + 1) / 2, in ints.
        pairs = 2 * pre.kv_len
        pairs += left
        pairs += 1
        pairs *= left
        g = pre.prefill_len + (self.config.block_size - 1)
        g //= self.config.block_size
        g -= pre.blocks
        np.maximum(g, 0, out=g)
        return (int(_sum(left)), 0.5 * float(_sum(pairs)), int(_sum(pre.blocks)),
                int(_sum(g)))

    def _incoming(self, pre: RequestSet, k_after: int) -> int:
        """New decode blocks of prefill requests that decode up to ``k_after`` steps after
        their hand-off inside the window. Bounded by max_tokens, not predicted: the window
        ends at the hand-off unless ``min_decode_steps`` holds it open for a few steps."""
        if k_after <= 0 or len(pre) == 0:
            return 0
        bs = self.config.block_size
        # Blocks for prefill_len + min(max_tokens - generated - 1, k_after) tokens, less
        # the prompt's blocks.
        if len(pre) <= _SMALL:
            return sum(-(-(pl + min(max(m - g - 1, 0), k_after)) // bs) - (-(-pl // bs))
                       for pl, m, g in zip(pre.prefill_len.tolist(), pre.max_tokens.tolist(),
                                           pre.generated.tolist()))
        steps = pre.max_tokens - pre.generated
        steps -= 1
        np.minimum(steps, k_after, out=steps)
        np.maximum(steps, 0, out=steps)
        steps += pre.prefill_len
        steps += bs - 1
        steps //= bs
        return int(_sum(steps)) - int(_sum(_ceil_div(pre.prefill_len, bs)))

    def _evaluate(self, pre: RequestSet, dec: RequestSet, k_cap: float, now_s: float,
                  next_arrival_s: float, prev: "_Eval | None" = None,
                  extra_pre: RequestSet | None = None,
                  extra_dec: RequestSet | None = None) -> "_Eval":
        """Windows and demands of the sets ``pre`` / ``dec`` with ``k <= k_cap``.

        With ``prev`` (an evaluation of the same ``pre`` and ``dec``), its predictions and
        sums are reused; ``extra_pre`` (admitted prompts) joins the prefill set and
        ``extra_dec`` (swapped requests resuming) the decode set.
        """
        cfg = self.config
        bs = cfg.block_size
        c0, c1, c2, c3, c4 = self.latency.c
        e = _Eval()
        if prev is not None:
            rem = prev.rem
            sums = prev.pre_sums
        else:
            rem = self.predictor.predict(dec.ids, dec.generated, dec.max_tokens)
            sums = self._pre_sums(pre)
        e.rem = rem
        e.pre_sums = sums
        npre = len(pre)
        if extra_pre is not None and len(extra_pre):
            x = self._pre_sums(extra_pre)
            sums = tuple(u + v for u, v in zip(sums, x))
            npre += len(extra_pre)
        kv_d, blocks_d = dec.kv_len, dec.blocks
        if prev is not None:
            dsums = prev.dec_sums
        elif rem.shape[0]:
            dsums = (int(_sum(kv_d)), float(_min(rem)), int(_sum(blocks_d)))
        else:
            dsums = (0, _INF, 0)
        e.dec_sums = dsums
        same_dec = True
        if extra_dec is not None and len(extra_dec):
            same_dec = False
            xrem = self.predictor.predict(extra_dec.ids, extra_dec.generated,
                                          extra_dec.max_tokens)
            rem = np.concatenate((rem, xrem))
            kv_d = np.concatenate((kv_d, extra_dec.kv_len))
            blocks_d = np.concatenate((blocks_d, extra_dec.blocks))
            dsums = (dsums[0] + int(extra_dec.kv_len.sum()), min(dsums[1], float(xrem.min())),
                     dsums[2] + int(extra_dec.blocks.sum()))
        nd = e.nd = rem.shape[0]
        if nd:
            e.ctx_d = float(dsums[0]) + nd
            e.step = c0 + c3 * nd + c4 * e.ctx_d
            first_finish = dsums[1]
        else:
            e.ctx_d = 0.0
            e.step = c0
            first_finish = _INF
        # The prefill batch in flight: every prompt token left, token_budget per step,
        # each step also carrying the decode set.
        handoff = _INF
        if npre:
            total, pairs, e.pre_static, e.pre_growth = sums
            e.pre_steps = max(1, -(-total // cfg.token_budget))
            e.pre_window = (e.pre_steps * (c0 + c3 * nd + c4 * e.ctx_d) + c1 * total
                            + c2 * pairs)
            handoff = e.pre_steps
        arrival = _INF
        if math.isfinite(next_arrival_s) and e.step > 0:
            arrival = max(1.0, math.ceil((next_arrival_s - now_s) / e.step))
        k = self._clip_k(min(first_finish, handoff, arrival))
        if k_cap != _INF:
            k = min(k, int(k_cap))
        e.k = k
        if nd:
            e.dec_static = dsums[2]
            if prev is not None and prev.k == k and same_dec:
                e.dec_growth_i = prev.dec_growth_i
                e.dec_growth = prev.dec_growth
            else:
                # max(ceil((kv_len + min(rem, k)) / bs) - blocks, 0), in place.
                g = np.minimum(rem, k)
                g += kv_d
                g += bs - 1
                g //= bs
                g -= blocks_d
                np.maximum(g, 0, out=g)
                e.dec_growth_i = g
                e.dec_growth = int(_sum(g))
        else:
            e.dec_growth_i = rem
        # Prefill requests handed off inside the window decode for its last k - pre_steps
        # steps: their new decode blocks belong to the decode pool's demand.
        k_after = k - e.pre_steps if npre else 0
        e.inc_base = (k_after, self._incoming(pre, k_after)) if prev is None or \
            prev.inc_base[0] != k_after else prev.inc_base
        if k_after > 0:
            e.incoming = e.inc_base[1]
            if extra_pre is not None:
                e.incoming += self._incoming(extra_pre, k_after)
        e.m_p = self._margin(e.pre_static + e.pre_growth, npre > 0)
        e.m_d = self._margin(e.dec_static + e.dec_growth + e.incoming,
                             nd > 0 or e.incoming > 0)
        return e

    def _margin(self, static_growth: int, nonempty: bool) -> int:
        if not nonempty:
            return 0
        cfg = self.config
        return int(math.ceil(cfg.margin_fraction * static_growth)) + int(cfg.margin_blocks)

    def _clip_k(self, k: float) -> int:
        cfg = self.config
        if k == _INF:
            return cfg.max_decode_steps
        return int(min(max(k, cfg.min_decode_steps), cfg.max_decode_steps))

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
        cfg = self.config
        supply = int(arena.supply_blocks)
        e = self._evaluate(prefill, decode, _INF, now_s, next_arrival_s)
        deficit = e.target - supply
        admit = 0
        if deficit <= 0 and waiting is not None and len(waiting):
            admit = self._admit(waiting, prefill, e, -deficit)
            if admit:
                w = _take(waiting, admit)
                sw = w.swapped
                extra_pre = extra_dec = None
                if sw.any():
                    extra_pre = _mask(w, ~sw)
                    extra_dec = _mask(w, sw)
                    extra_dec.blocks = _ceil_div(extra_dec.kv_len, cfg.block_size)
                else:
                    extra_pre = w
                # k may only get smaller: every demand stays within what _admit counted.
                e = self._evaluate(prefill, decode, e.k, now_s, next_arrival_s, prev=e,
                                   extra_pre=extra_pre, extra_dec=extra_dec)
                over = e.target - supply
                if over > 0:   # rounding of margins only
                    cut = min(over, e.m_d)
                    e.m_d -= cut
                    e.m_p -= min(over - cut, e.m_p)
                deficit = 0
        preempt = np.zeros(0, dtype=np.int64)
        swap = np.zeros(0, dtype=bool)
        shortfall = 0
        if deficit > 0:
            # The condition fails: margins first, then decode preemptions.
            cut = min(deficit, e.m_d)
            e.m_d -= cut
            deficit -= cut
            cut = min(deficit, e.m_p)
            e.m_p -= cut
            deficit -= cut
            if deficit > 0 and e.nd:
                order = np.asarray(cfg.victim(decode, e.rem), dtype=np.int64)
                freed = np.cumsum((decode.blocks + e.dec_growth_i)[order])
                nv = min(int(np.searchsorted(freed, deficit, side="left")) + 1, e.nd)
                victims = order[:nv]
                deficit -= int(freed[nv - 1])
                e.dec_static -= int(decode.blocks[victims].sum())
                e.dec_growth -= int(e.dec_growth_i[victims].sum())
                preempt = decode.ids[victims]
                swap = np.asarray(cfg.preemption(decode.kv_len[victims],
                                                 decode.blocks[victims], cfg.block_bytes,
                                                 self.latency), dtype=bool)
            if deficit > 0 and e.incoming:
                cut = min(deficit, e.incoming)
                e.incoming -= cut
                deficit -= cut
            if deficit > 0:
                # Even with no decode set the prefill batch is short: prefill gets what is
                # left (never less than it holds) and the shortfall is reported.
                cut = min(deficit, e.pre_growth)
                e.pre_growth -= cut
                shortfall = deficit
        return self._finish(e, admit, preempt, swap, shortfall, arena, window_end,
                            admission_rate_blocks_s)

    def _admit(self, waiting: RequestSet, prefill: RequestSet, e: "_Eval",
               leftover: int) -> int:
        """How many requests from the head of ``waiting`` to admit.

        Each candidate is charged an upper bound of what it adds to the union's demand, so
        the plan recomputed on the union (with k no larger) still fits: blocks for its
        prompt (or, swapped, its KV) plus its decode growth for the steps it can decode
        inside the window, plus its margin share; the first entrant of an empty pool pays
        that pool's ``margin_blocks``.
        """
        cfg = self.config
        bs = cfg.block_size
        room = cfg.max_running - e.nd - len(prefill)
        if room <= 0:
            return 0
        # The token budget of the batch in flight first (an empty batch always takes one):
        # it usually leaves a handful of candidates to price.
        left_now = e.pre_sums[0]
        sw = waiting.swapped[:room]
        toks = np.cumsum(np.where(sw, 0, waiting.prefill_len[:room]))
        n = int(np.searchsorted(toks, cfg.max_prefill_tokens - left_now, side="right"))
        if n == 0 and len(prefill) == 0:
            n = 1
        if n == 0:
            return 0
        w = _take(waiting, n)
        sw = sw[:n]
        # A swapped entry decodes for up to k steps; a prefill entry for at most
        # min(k, min_decode_steps) - 1 steps after its hand-off (the recomputed window
        # ends at the hand-off unless min_decode_steps holds it open).
        steps_pre = max(min(e.k, cfg.min_decode_steps) - 1, 0)
        any_sw = bool(sw.any())
        if any_sw:
            rem = self.predictor.predict(w.ids, w.generated, w.max_tokens)
            steps = np.where(sw, np.minimum(rem, e.k), steps_pre)
            base = np.where(sw, w.kv_len, w.prefill_len)
        else:
            steps, base = steps_pre, w.prefill_len
        bare = _ceil_div(base + steps, bs)
        cost = bare + np.ceil(cfg.margin_fraction * bare).astype(np.int64)
        if len(prefill) == 0 and not (any_sw and sw.all()):
            cost[int(np.argmax(~sw)) if any_sw else 0] += cfg.margin_blocks
        if e.nd == 0 and e.incoming == 0:
            cost[0] += cfg.margin_blocks
        fit = int(np.searchsorted(np.cumsum(cost), leftover, side="right"))
        if fit == 0 and e.nd == 0 and len(prefill) == 0 and bare[0] <= leftover:
            fit = 1   # alone on the device: margins must not keep it out forever
        return fit

    def _finish(self, e: "_Eval", admit: int, preempt: np.ndarray, swap: np.ndarray,
                shortfall: int, arena: ArenaState, window_end: bool,
                admission_rate: float = 0.0) -> Plan:
        cfg = self.config
        c4 = self.latency.c[4]
        k, nd = e.k, e.nd
        # Each step reads one more token per sequence: price the window at its mid-point.
        decode_window = k * (e.step + c4 * nd * (k - 1) * 0.5) if nd else 0.0
        pre = Demand(e.pre_static, e.pre_growth, e.m_p)
        dec = Demand(e.dec_static, e.dec_growth + e.incoming, e.m_d)
        t_p, t_d = pre.target, dec.target
        bpc = max(int(arena.blocks_per_chunk), 1)
        thresh = cfg.shrink_min_blocks if cfg.shrink_min_blocks is not None else bpc
        reserve = 0
        if admission_rate > 0 and cfg.arrival_reserve_s > 0:
            reserve = min(math.ceil(admission_rate * cfg.arrival_reserve_s),
                          max(int(arena.supply_blocks) - t_p - t_d, 0))
        top = -(-(t_p + t_d + reserve) // bpc) * bpc
        shrink = bool(window_end and arena.mapped_blocks - top >= max(thresh, 1))
        return Plan(prefill_window_s=float(e.pre_window), decode_window_s=float(decode_window),
                    decode_steps=int(k), prefill_steps=int(e.pre_steps),
                    step_time_s=float(e.step), prefill=pre, decode=dec,
                    prefill_target=t_p, decode_target=t_d, admit=int(admit),
                    preempt_ids=preempt, preempt_swap=swap, fits=shortfall == 0,
                    shortfall_blocks=int(shortfall), shrink=shrink,
                    reserve_blocks=int(reserve), remaining=e.rem)


class _Eval:
    """Intermediate numbers of one evaluation (see :meth:`WindowPlanner._evaluate`)."""

    __slots__ = ("pre_sums", "dec_sums", "inc_base", "nd", "rem", "ctx_d", "step", "pre_steps",
                 "pre_window", "pre_static",
                 "pre_growth", "k", "dec_growth_i", "dec_static", "dec_growth", "incoming",
                 "m_p", "m_d")

    def __init__(self) -> None:
        self.pre_steps = 0
        self.pre_window = 0.0
        self.pre_static = self.pre_growth = 0
        self.dec_static = self.dec_growth = self.incoming = 0

    @property
    def target(self) -> int:
        return (self.pre_static + self.pre_growth + self.m_p + self.dec_static
                + self.dec_growth + self.incoming + self.m_d)


def _take(s: RequestSet, n: int) -> RequestSet:
    return RequestSet(s.ids[:n], s.kv_len[:n], s.prefill_len[:n], s.generated[:n],
                      s.max_tokens[:n], s.blocks[:n], s.admit_seq[:n], s.swapped[:n])


def _mask(s: RequestSet, m: np.ndarray) -> RequestSet:
    return RequestSet(s.ids[m], s.kv_len[m], s.prefill_len[m], s.generated[m],
                      s.max_tokens[m], s.blocks[m], s.admit_seq[m], s.swapped[m])

