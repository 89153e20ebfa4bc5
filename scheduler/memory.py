"""Memory policies: how the loop's two pools get and give back device memory.

A policy acts on a :class:`~scheduler.metered.MeteredArena` (every lease change, map,
unmap and compaction it makes is charged there) and reads the loop's queues through a
:class:`~scheduler.decision.QueueView`; what it wants done to requests (preempt, admit) it
returns as a :class:`~scheduler.decision.Decision` that the loop carries out.

* ``static`` — maps ``static_bytes`` at start (like vLLM / SGLang reserving a fraction of
  the GPU) and never gives anything back; leases move freely inside what is mapped (its
  cap is lowered to what it mapped).
* ``on-demand`` — when a block is needed, takes mapped memory first (the other pool's
  unused lease, mapped-unleased blocks), then grows by ``on_demand_chunks`` chunks
  (mapping); when blocks are freed (finishes, preemptions), lowers the leases to what the
  pools hold and unmaps every chunk that holds nothing, after that phase's admissions had
  their pick (at once when the engine goes idle). No compaction, no prediction.
* ``windowed`` — this library's method: once per window the
  :class:`~scheduler.planner.WindowPlanner` sets both pools' *budgets* to the predicted
  demand (static + growth over the window), preempts deliberately when the device cannot
  supply it, and admits only what fits over the window. Leases grow inside the budgets as
  blocks are needed, taking mapped memory first, as on-demand's do; a lease that must grow
  past the budgets (a misprediction) is an emergency grow or, failing that, a preemption.
  At the window end it compacts and unmaps what the next window does not need (in place,
  without compaction, when a chunk holds one block). A finish lowers the budget by the
  request's blocks and the growth the plan still held for it, and free chunks go back after
  that phase's admissions; the window closes (budgets 0, everything unmapped) when the
  engine goes idle.

With a background mapper (``LoopConfig.mapper``), both elastic policies map ahead what the
running requests of the batch in flight will take next (decode rows opening a block, next
prompt chunks; what preemptions and admissions change is not foreseen) plus what
admissions took lately (:class:`~scheduler.prefetch.PrefetchLearner`), and their releases
are done by the mapper, in batches, once the spare passes the top of its hysteresis band
(:meth:`MemoryPolicy.spare_target`).

The hooks (every one but :meth:`MemoryPolicy.grow` has a default):
``start()`` once; ``decide(view) -> Decision | None`` before each step;
``carried_out(view, decision)`` after the loop carried a decision out;
``grow(pool, n, admission) -> bool`` when a pool needs ``n`` more blocks of lease (no
preemption); ``on_free(pool, n, req_id)`` when finished request ``req_id`` freed ``n``
blocks;
``after_step(view)`` after each model step; ``spare_target(view) -> int | None`` when a
step is launched: spare blocks the background mapper should keep mapped (None: no mapping
ahead).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from .decision import Decision, QueueView
from .latency import LatencyModel
from .metered import DECODE, PREFILL, MeteredArena
from .planner import ArenaState, PlanLimits, PlannerConfig, WindowPlanner
from .prefetch import PrefetchLearner
from .registry import Registry

# The admission rate that sizes the windowed policy's arrival reserve is measured over
# this many seconds of the loop's clock: long enough to smooth single arrivals, short
# enough to follow load changes within a minute.
_RATE_HORIZON_S = 30.0


@dataclass(frozen=True)
class PolicySettings:
    """What a memory policy is told about the loop it serves (see
    :class:`~scheduler.loop.LoopConfig` for each field): the latency model and predictor
    the planner uses, the victim order and preemption mode, batch limits (tokens per step,
    sequences, prompt tokens in flight), and each policy's knobs."""

    latency: LatencyModel
    predictor: Any
    victim: Any
    preemption: Any
    token_budget: int
    max_running: int
    max_prefill_tokens: int
    watermark_fraction: float = 0.01
    on_demand_chunks: int = 1
    static_bytes: int | None = None
    planner: PlannerConfig | None = None
    prefetch_quantile: float = 0.9


class MemoryPolicy:
    """Base class: first-come-first-served admission under a watermark, nothing else."""

    name = ""

    def __init__(self, arena: MeteredArena, settings: PolicySettings) -> None:
        self.arena = arena
        self.settings = settings
        self.watermark_blocks = math.ceil(settings.watermark_fraction * arena.cap_blocks)

    def start(self) -> None:
        """Called once when the loop is built."""

    def decide(self, view: QueueView) -> Decision | None:
        """What to do before the next step (None: nothing)."""
        if not view.num_waiting:
            return None
        return Decision.first_come_first_served(self.watermark_blocks)

    def carried_out(self, view: QueueView, decision: Decision) -> None:
        """The loop carried ``decision`` out; ``view`` shows the queues after it."""

    def grow(self, pool: str, n: int, admission: bool = False) -> bool:
        """Give ``pool`` at least ``n`` more blocks of lease; False if memory is not there.
        ``admission``: for a request being admitted (not a running one's lease miss)."""
        raise NotImplementedError

    def on_free(self, pool: str, n: int, req_id: int = -1) -> None:
        """``n`` blocks of ``pool`` were just freed (request ``req_id`` finished)."""

    def after_step(self, view: QueueView) -> None:
        """Called after every model step."""

    def spare_target(self, view: QueueView) -> int | None:
        """Called when a step is launched (after its batch allocated its blocks): spare
        (mapped, unleased) blocks the background mapper should keep while it runs (None,
        the default: no mapping ahead). The elastic policies also carry out the releases
        they deferred here: a subclass that overrides it calls ``super()``."""
        return None


class _ReleaseAfterAdmissions(MemoryPolicy):
    """Gives free chunks back once the phase that freed them has admitted what it will.

    A finish (or a preemption) marks memory to release; the release waits until the next
    step is launched, when that phase's admissions have allocated their first prompt
    chunks (they take mapped chunks instead of the release unmapping them and the
    admission mapping them again a moment later). With a background mapper the release is
    the mapper's, batched, down to the spare it keeps for the next step."""

    def __init__(self, arena: MeteredArena, settings: PolicySettings) -> None:
        super().__init__(arena, settings)
        self._release_pending = False
        self._preemptions = 0
        self.prefetch = PrefetchLearner(settings.prefetch_quantile)
        self._allocated_seen = 0
        self._lookahead = 0

    def spare_target(self, view: QueueView) -> int | None:
        """Releases what was marked, then (with a background mapper) asks for the blocks
        the next step takes for running requests (exact) plus a learned allowance for what
        it cannot foresee (admissions, swap-ins): what the previous launch's lookahead
        missed is the learner's sample."""
        self._release()
        a = self.arena
        if a.mapper_mode == "off":
            return None
        allocated = a.blocks_allocated
        self.prefetch.observe(allocated - self._allocated_seen - self._lookahead)
        self._allocated_seen = allocated
        self._lookahead = view.next_step_blocks()
        return self._lookahead + self.prefetch.allowance()

    def _mark_release(self, view: QueueView | None = None) -> None:
        if view is not None:
            if view.preemptions == self._preemptions:
                return
            self._preemptions = view.preemptions
        self._release_pending = True

    def _release(self) -> None:
        if not self._release_pending:
            return
        self._release_pending = False
        # unused lease first goes back to the arena, so its chunks can be released
        self.arena.lower_to(PREFILL, 0)
        self.arena.lower_to(DECODE, 0)
        self.arena.release_free_chunks()

    @staticmethod
    def _idle(view: QueueView) -> bool:
        """Nothing running or waiting: no admission is coming before the next arrival."""
        return not (view.num_prefill or view.num_decode or view.num_waiting)


class StaticMemory(MemoryPolicy):
    """Map ``static_bytes`` (under the cap) at start; never unmap."""

    name = "static"

    def start(self) -> None:
        a = self.arena
        want = self.settings.static_bytes or a.cap_bytes
        blocks = min(want // a.chunk_bytes * a.blocks_per_chunk, a.cap_blocks)
        if blocks < 1:
            raise ValueError(f"static_bytes={want} is below one chunk ({a.chunk_bytes} B)")
        # Leasing everything once maps it; dropping the lease keeps it mapped.
        a.resize(PREFILL, blocks, "static")
        a.resize(PREFILL, 0)
        a.lower_cap(blocks)

    def grow(self, pool: str, n: int, admission: bool = False) -> bool:
        return self.arena.grow(pool, n)   # inside mapped memory: no mapping

    def on_free(self, pool: str, n: int, req_id: int = -1) -> None:
        self.arena.lower_to(pool, self.arena.lease(pool) - n)


class OnDemandMemory(_ReleaseAfterAdmissions):
    """Grow by chunks when a block is needed; give free chunks back when blocks are freed,
    after the admissions of the same phase (see :class:`_ReleaseAfterAdmissions`)."""

    name = "on-demand"

    def grow(self, pool: str, n: int, admission: bool = False) -> bool:
        a = self.arena
        # Mapped memory first: the other pool's unused lease (a prompt's chunk handed off
        # leaves some) and every mapped-unleased block are taken before anything is mapped;
        # past them, whole steps of on_demand_chunks chunks; just n when the cap or the
        # device leaves less.
        a.lower_to(DECODE if pool == PREFILL else PREFILL, 0)
        step = a.blocks_per_chunk * self.settings.on_demand_chunks
        spare = a.spare_blocks
        # Without a mapper the lease takes every spare block (each later raise is free);
        # with one, just what is needed, so the spare stays the mapper's to size.
        if spare >= n:
            want = n if a.mapper_mode != "off" else spare
        else:
            want = spare + -(-(n - spare) // step) * step
        for g in dict.fromkeys((want, n)):
            if a.grow(pool, g):
                a.counters.on_demand_grows += 1
                return True
        return False

    def on_free(self, pool: str, n: int, req_id: int = -1) -> None:
        self.arena.lower_to(pool, 0)
        self._mark_release()

    def after_step(self, view: QueueView) -> None:
        # Preemptions since the last step freed blocks too.
        self._mark_release(view)
        if self._idle(view):
            # Nothing to admit: nothing stays mapped across an idle gap.
            self._release()
            self.arena.release_all()


class WindowedMemory(_ReleaseAfterAdmissions):
    """Leases set once per window by the :class:`WindowPlanner` (see the module docstring).

    A full window boundary comes when the decode window's steps are done or the prefill
    batch in flight has been handed off; it may shrink. Between boundaries, an arrival or
    a finish re-plans to admit (without shrinking and without restarting the window).
    """

    name = "windowed"

    def __init__(self, arena: MeteredArena, settings: PolicySettings) -> None:
        super().__init__(arena, settings)
        s = settings
        # What the loop fixes (block geometry, batch limits, victim order, preemption mode)
        # reaches the planner as limits; the config holds the planner's own knobs, and a
        # knob it sets that contradicts the loop is an error, not silently overwritten.
        self.planner = WindowPlanner(
            s.latency, s.predictor, s.planner if s.planner is not None else PlannerConfig(),
            limits=PlanLimits(block_size=arena.spec.block_size, block_bytes=arena.block_bytes,
                              token_budget=s.token_budget, max_running=s.max_running,
                              max_prefill_tokens=s.max_prefill_tokens),
            victim=s.victim, preemption=s.preemption)
        self.config = self.planner.config
        self.plan = None            # the last plan
        self.budgets = (0, 0)       # (prefill, decode) lease budgets from the last plan
        self.window_steps = 0       # the current window's length in steps
        self.steps_in_window = 0
        self._had_prefill = False
        # (clock s, prompt blocks admitted so far) at recent plans: the admission rate
        self._admitted: deque[tuple[float, int]] = deque()

    def admission_rate(self, view: QueueView) -> float:
        """Prompt blocks prefilled per second (the memory admissions bring in) over about
        the last ``_RATE_HORIZON_S`` seconds of the loop's clock; records a sample."""
        now = view.now
        blocks = view.prompt_tokens_processed // self.planner.limits.block_size
        hist = self._admitted
        hist.append((now, blocks))
        while len(hist) > 2 and hist[1][0] <= now - _RATE_HORIZON_S:
            hist.popleft()
        t0, b0 = hist[0]
        return (blocks - b0) / (now - t0) if now > t0 else 0.0

    def decide(self, view: QueueView) -> Decision | None:
        full = (self.plan is None or self.steps_in_window >= self.window_steps
                or (self._had_prefill and not view.num_prefill))
        if not full:
            running = view.num_prefill + view.num_decode
            if not (view.changed and view.num_waiting and running < view.max_running
                    and view.prefill_tokens_left() < view.max_prefill_tokens):
                return None
        return self.plan_window(view, window_end=full)

    def plan_window(self, view: QueueView, window_end: bool = True) -> Decision:
        """Plan now; returns the decision (preemptions, leases, a shrink at a window end,
        admissions) with its :class:`~scheduler.planner.Plan`."""
        a = self.arena
        room = view.max_running - view.num_prefill - view.num_decode
        wait = view.waiting_set(room) if room > 0 and view.num_waiting else None
        plan = self.planner.plan(
            view.prefill_set(), view.decode_set(), wait,
            ArenaState(a.supply_blocks(), a.mapped_blocks, a.blocks_per_chunk),
            now_s=view.now, next_arrival_s=view.next_arrival_s, window_end=window_end,
            admission_rate_blocks_s=self.admission_rate(view) if window_end else 0.0)
        # A chunk of one block can go back where it lies: compaction would move blocks for
        # nothing, so the free chunks are released in place instead.
        compact = plan.shrink and a.blocks_per_chunk > 1
        if plan.shrink and not compact:
            self._release_pending = True
        return Decision(
            preempt=tuple(zip(plan.preempt_ids.tolist(), plan.preempt_swap.tolist())),
            budgets=(plan.prefill_target, plan.decode_target), shrink=compact,
            keep_blocks=max(plan.reserve_blocks, self.prefetch.allowance()),
            admit=plan.admit, window_end=window_end, plan=plan)

    def carried_out(self, view: QueueView, decision: Decision) -> None:
        if decision.budgets is not None:
            self.budgets = decision.budgets
        if decision.window_end:
            self.window_steps = decision.plan.decode_steps
            self.steps_in_window = 0
            self._had_prefill = bool(view.num_prefill)
        else:
            self._had_prefill = self._had_prefill or bool(view.num_prefill)
        self.plan = decision.plan

    def grow(self, pool: str, n: int, admission: bool = False) -> bool:
        """Raise ``pool``'s lease by ``n`` (mapped memory first, then mapping). Inside the
        budgets this is the plan being followed; past them it is an emergency grow (the
        plan under-predicted), counted."""
        a = self.arena
        a.lower_to(DECODE if pool == PREFILL else PREFILL, 0)   # unused lease first
        # The budgets are judged together: a hand-off moves lease from prefill to decode.
        over = a.leased_blocks + n > sum(self.budgets)
        if not a.grow(pool, n):
            return False
        if over and not admission:
            a.counters.emergency_grows += 1
        return True

    def on_free(self, pool: str, n: int, req_id: int = -1) -> None:
        # The finished request's blocks and the growth the plan still held for it leave
        # the budget now, not at the next window end; the chunks go back after this
        # phase's admissions (see _ReleaseAfterAdmissions).
        extra = 0
        plan = self.plan
        if pool == DECODE and plan is not None and req_id >= 0:
            hit = np.flatnonzero(plan.decode_ids == req_id)
            if hit.size:
                extra = max(int(plan.decode_planned_blocks[hit[0]]) - n, 0)
        b = list(self.budgets)
        i = 0 if pool == PREFILL else 1
        b[i] = max(b[i] - n - extra, 0)
        self.budgets = (b[0], b[1])
        self.arena.lower_to(pool, 0)
        self._mark_release()

    def after_step(self, view: QueueView) -> None:
        self.steps_in_window += 1
        if not self._idle(view):
            return
        # The engine went idle: the window closes and everything goes back, so nothing
        # stays mapped across an idle gap; the next arrival opens a new window.
        a = self.arena
        a.set_leases(0, 0)
        self.budgets = (0, 0)
        if a.mapped_blocks:
            a.release_all()   # nothing is live: every chunk is free, no block moves
        a.counters.idle_closes += 1
        self.plan = None
        self._release_pending = False


#: Memory policies by name; each is built with ``(arena=MeteredArena,
#: settings=PolicySettings)``. A :class:`MemoryPolicy` instance is accepted as is.
MEMORY_POLICIES: Registry[MemoryPolicy] = Registry(
    "memory", {p.name: p for p in (StaticMemory, OnDemandMemory, WindowedMemory)},
    accepts=lambda p: isinstance(p, MemoryPolicy))
