"""Memory policies: how the loop's two pools get and give back device memory.

All three drive the same arena code through :class:`~scheduler.loop.EngineLoop`:

* ``static`` — maps ``static_bytes`` at start (like vLLM / SGLang reserving a fraction of
  the GPU) and never gives anything back; leases move freely inside what is mapped.
* ``on-demand`` — grows a pool's lease by ``on_demand_chunks`` chunks when a block is
  needed (mapping if the arena must grow); when blocks are freed, lowers the lease to what
  the pool holds and calls ``arena.release_free_chunks()``. No compaction, no prediction.
* ``windowed`` — this library's method: once per window the
  :class:`~scheduler.planner.WindowPlanner` sets both leases to the predicted demand
  (mapping as needed), preempts when the device cannot supply it, admits what fits, and at
  the window end compacts and unmaps what the next window does not need. A lease miss
  mid-window (a misprediction) is served by an emergency grow or, failing that, a
  preemption.

A policy implements ``start()``, ``before_step()`` (admission, windows), ``grow(pool, n,
admission=False) -> bool`` (make ``n`` more blocks of lease; no preemption),
``on_free(pool, n)`` and ``after_step()``.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from arena import ArenaOutOfMemory

from .metrics import EVENT_WINDOW
from .planner import ArenaState, PlannerConfig, WindowPlanner
from .request import Phase, RequestSet

# The admission rate that sizes the windowed policy's arrival reserve is measured over
# this many seconds of the loop's clock: long enough to smooth single arrivals, short
# enough to follow load changes within a minute.
_RATE_HORIZON_S = 30.0

if TYPE_CHECKING:  # pragma: no cover
    from .loop import EngineLoop


class MemoryPolicy:
    """Base class: shared admission for the reactive policies."""

    name = ""

    def __init__(self, loop: "EngineLoop") -> None:
        self.loop = loop

    def start(self) -> None:
        """Called once when the loop is built."""

    def before_step(self) -> None:
        """Called at the start of every step, before the batch is formed."""
        self._admit_fcfs()

    def grow(self, pool, n: int, admission: bool = False) -> bool:
        """Give ``pool`` at least ``n`` more blocks of lease; False if memory is not there."""
        raise NotImplementedError

    def on_free(self, pool, n: int) -> None:
        """``n`` blocks of ``pool`` were just freed (a request finished)."""

    def after_step(self) -> None:
        """Called after every model step."""

    def free_blocks(self) -> int:
        """Blocks a new lease could still take (reactive admission)."""
        raise NotImplementedError

    def _admit_fcfs(self) -> None:
        """Admit from the head of the queue while sequences, the prefill token budget and
        free memory (less a watermark) allow; stop at the first that does not fit."""
        loop = self.loop
        if not loop.num_waiting:
            return
        room = loop.max_running - len(loop._prefill) - len(loop._decode)
        tokens = loop.prefill_tokens_left()
        watermark = math.ceil(loop.config.watermark_fraction * loop.cap_blocks)
        for r in loop.waiting_requests():
            if room <= 0:
                break
            swapped = r.phase == Phase.SWAPPED
            if swapped:
                need = int(r.swap_data.shape[0])
            else:
                need = loop.spec.blocks_for(r.prefill_len)
                if loop._prefill and tokens + r.prefill_len > loop.max_prefill_tokens:
                    break
            if need + watermark > self.free_blocks() and (loop._prefill or loop._decode):
                break
            if not loop.admit(r):
                break
            room -= 1
            if not swapped:
                tokens += r.prefill_len


class StaticMemory(MemoryPolicy):
    """Map ``static_bytes`` (under the cap) at start; never unmap."""

    name = "static"

    def start(self) -> None:
        loop = self.loop
        a = loop.arena
        want = loop.config.static_bytes or loop.cap_bytes
        blocks = min(want // a.chunk_bytes * a.blocks_per_chunk, loop.cap_blocks)
        if blocks < 1:
            raise ValueError(f"static_bytes={want} is below one chunk ({a.chunk_bytes} B)")
        self._blocks = blocks
        # Leasing everything once maps it; dropping the lease keeps it mapped.
        loop.resize(loop.pool_prefill, blocks, "static")
        loop.pool_prefill.resize(0)

    def free_blocks(self) -> int:
        a = self.loop.arena
        return a.mapped_blocks - a.leased_blocks

    def limit_blocks(self) -> int:
        """Blocks mapped at start: all static ever has."""
        return self._blocks

    def grow(self, pool, n: int, admission: bool = False) -> bool:
        if self.free_blocks() < n:
            return False
        pool.resize(pool.lease + n)   # inside mapped memory: no mapping
        return True

    def on_free(self, pool, n: int) -> None:
        pool.resize(max(pool.num_owned, pool.lease - n))


class OnDemandMemory(MemoryPolicy):
    """Grow by chunks when a block is needed; give free chunks back when blocks are freed."""

    name = "on-demand"

    def __init__(self, loop: "EngineLoop") -> None:
        super().__init__(loop)
        self._freed = False
        self._preemptions = 0

    def free_blocks(self) -> int:
        loop = self.loop
        return loop.supply_blocks() - loop.arena.leased_blocks

    def grow(self, pool, n: int, admission: bool = False) -> bool:
        loop = self.loop
        a = loop.arena
        step = a.blocks_per_chunk * loop.config.on_demand_chunks
        headroom = loop.cap_blocks - a.leased_blocks
        for g in dict.fromkeys((-(-n // step) * step, n)):
            if g > headroom:
                continue
            try:
                loop.resize(pool, pool.lease + g)
            except ArenaOutOfMemory:
                continue
            loop.metrics.counters.on_demand_grows += 1
            return True
        return False

    def on_free(self, pool, n: int) -> None:
        pool.resize(pool.num_owned)
        self._freed = True

    def after_step(self) -> None:
        loop = self.loop
        # Blocks were freed (finishes, or preemptions since the last step): leases drop to
        # what the pools hold and every chunk that holds nothing goes back.
        preemptions = loop.metrics.counters.preemptions
        if not self._freed and preemptions == self._preemptions:
            return
        self._freed = False
        self._preemptions = preemptions
        for pool in (loop.pool_prefill, loop.pool_decode):
            if pool.lease > pool.num_owned:
                pool.resize(pool.num_owned)
        loop._arena_op("release", loop.arena.release_free_chunks)
        loop.metrics.counters.release_calls += 1


class WindowedMemory(MemoryPolicy):
    """Leases set once per window by the :class:`WindowPlanner` (see the module docstring).

    A full window boundary comes when the decode window's steps are done or the prefill
    batch in flight has been handed off; it may shrink. Between boundaries, an arrival or
    a finish re-plans to admit (without shrinking and without restarting the window).
    """

    name = "windowed"

    def __init__(self, loop: "EngineLoop") -> None:
        super().__init__(loop)
        base = loop.config.planner if loop.config.planner is not None else PlannerConfig()
        self.config = replace(base, block_size=loop.block_size, block_bytes=loop.block_bytes,
                              token_budget=loop.config.token_budget,
                              max_running=loop.max_running,
                              max_prefill_tokens=loop.max_prefill_tokens,
                              victim=loop.victim, preemption=loop.preemption)
        self.planner = WindowPlanner(loop.latency, loop.predictor, self.config)
        self.plan = None            # the last plan
        self.window_steps = 0       # the current window's length in steps
        self.steps_in_window = 0
        self._had_prefill = False
        # (clock s, prompt blocks admitted so far) at recent plans: the admission rate
        self._admitted: deque[tuple[float, int]] = deque()

    def admission_rate(self) -> float:
        """Prompt blocks prefilled per second (the memory admissions bring in) over about
        the last ``_RATE_HORIZON_S`` seconds of the loop's clock; records a sample."""
        loop = self.loop
        blocks = loop.metrics.counters.prefill_tokens // loop.block_size
        hist = self._admitted
        hist.append((loop.now, blocks))
        while len(hist) > 2 and hist[1][0] <= loop.now - _RATE_HORIZON_S:
            hist.popleft()
        t0, b0 = hist[0]
        return (blocks - b0) / (loop.now - t0) if loop.now > t0 else 0.0

    def before_step(self) -> None:
        loop = self.loop
        full = (self.plan is None or self.steps_in_window >= self.window_steps
                or (self._had_prefill and not loop._prefill))
        if not full:
            running = len(loop._prefill) + len(loop._decode)
            if not (loop.dirty and loop.num_waiting and running < loop.max_running
                    and loop.prefill_tokens_left() < loop.max_prefill_tokens):
                return
        self.plan_window(window_end=full)

    def plan_window(self, window_end: bool = True):
        """Plan now and carry the plan out: preemptions, leases (growing maps memory),
        a shrink at a window end (compaction on the device, unmap), admissions. Returns
        the :class:`~scheduler.planner.Plan`."""
        loop = self.loop
        a = loop.arena
        c = loop.metrics.counters
        t0 = time.perf_counter()
        room = loop.max_running - len(loop._prefill) - len(loop._decode)
        wait = loop.waiting_requests()[:max(room, 0)]
        plan = self.planner.plan(
            RequestSet.from_requests(loop._prefill.values()),
            RequestSet.from_requests(loop._decode.values()),
            RequestSet.from_requests(wait) if wait else None,
            ArenaState(loop.supply_blocks(), a.mapped_blocks, a.blocks_per_chunk),
            now_s=loop.now,
            next_arrival_s=loop._pending[0][0] if loop._pending else math.inf,
            window_end=window_end,
            admission_rate_blocks_s=self.admission_rate() if window_end else 0.0)
        c.plans += 1
        c.plan_wall_s += time.perf_counter() - t0
        for rid, swap in zip(plan.preempt_ids.tolist(), plan.preempt_swap.tolist()):
            loop.preempt(loop.requests[rid], bool(swap))
        self._set_leases(plan.prefill_target, plan.decode_target)
        if plan.shrink:
            # The reserve rides on the prefill lease through the shrink, so the chunks that
            # hold it stay mapped; the lease drops back after (lowering unmaps nothing).
            pool = loop.pool_prefill
            extra = max(0, min(plan.reserve_blocks, a.mapped_blocks - a.leased_blocks))
            pool.resize(pool.lease + extra)
            loop._arena_op("shrink", a.shrink)
            pool.resize(pool.lease - extra)
            c.shrinks += 1
        for r in wait[:plan.admit]:
            if not loop.admit(r):
                break
        if window_end:
            c.windows += 1
            self.window_steps = plan.decode_steps
            self.steps_in_window = 0
            self._had_prefill = bool(loop._prefill)
            loop._sample(EVENT_WINDOW)
        else:
            self._had_prefill = self._had_prefill or bool(loop._prefill)
        self.plan = plan
        loop.dirty = False
        return plan

    def _set_leases(self, t_prefill: int, t_decode: int) -> None:
        loop = self.loop
        a = loop.arena
        pools = ((loop.pool_prefill, t_prefill), (loop.pool_decode, t_decode))
        for pool, t in pools:       # lower first: what one gives, the other may take
            if t < pool.lease:
                pool.resize(max(t, pool.num_owned))
        for pool, t in pools:
            if t > pool.lease:
                t = min(t, pool.lease + loop.cap_blocks - a.leased_blocks)
                try:
                    loop.resize(pool, t)
                except ArenaOutOfMemory:
                    # The device gave less than it said: take what there is.
                    t = min(t, pool.lease + a.available_blocks())
                    try:
                        loop.resize(pool, t)
                    except ArenaOutOfMemory:
                        pass

    def grow(self, pool, n: int, admission: bool = False) -> bool:
        loop = self.loop
        if loop.arena.leased_blocks + n > loop.cap_blocks:
            return False
        try:
            loop.resize(pool, pool.lease + n)
        except ArenaOutOfMemory:
            return False
        if not admission:
            loop.metrics.counters.emergency_grows += 1
        return True

    def after_step(self) -> None:
        self.steps_in_window += 1


_POLICIES = {"static": StaticMemory, "on-demand": OnDemandMemory, "windowed": WindowedMemory}


def make_memory_policy(loop: "EngineLoop") -> MemoryPolicy:
    """The policy named by ``loop.config.memory``."""
    return _POLICIES[loop.config.memory](loop)
