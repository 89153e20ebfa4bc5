"""The one owner of device memory on the scheduler's side: the arena, its two pools, the
cap, the cost model, the arena counters and the clock charge.

:class:`MeteredArena` is what memory policies (:mod:`scheduler.memory`) and the loop
(:mod:`scheduler.loop`) change memory through. Every lease change, map, unmap, compaction
and swap is one of its methods; each is timed, priced by the cost model
(:mod:`scheduler.costs`), charged to the shared :class:`Clock`, split per part into the
run's :class:`~scheduler.metrics.Counters`, and reported to an ``on_event`` callback when
it mapped or unmapped (the loop samples its timeline there). Block bookkeeping that maps
nothing (allocate, free, hand-off, block tables) goes through it too, uncharged, so that
nothing else holds a pool.

Background mapping (``mapper``): with ``"inline"`` or ``"thread"`` a background mapper
keeps spare (mapped, unleased) blocks near what the policy expects the next step to take
(:meth:`MeteredArena.map_ahead`, called when a step is launched), and the unmaps a policy
asks for (:meth:`MeteredArena.release_free_chunks`) are deferred to it and batched. A lease
raise that finds spare blocks needs no driver call; one that does not maps on the loop's
thread (a *miss*, critical path). ``"inline"`` is the replay's model of that mapper: the
work is done at the launch but charged to ``time_background_s``, overlapping the step, and
the loop's clock waits only where it needs the driver or the new spare blocks before the
mapper is done (``mapper_wait_s``); it needs a modeled cost model, since its wall-clock time
is spent on the calling thread. ``"thread"`` runs :class:`arena.BackgroundMapper`: real
driver calls on another thread, their wall-clock time in ``time_background_s``.

It knows no requests and no queues: ids passed to it are block-table sequence ids.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from arena import ArenaOutOfMemory, BackgroundMapper, PagedArena

from .costs import COST_PARTS, ArenaOp, CostModel, WallClockCost, as_cost_model
from .metrics import EVENT_MAP, EVENT_UNMAP, Counters

PREFILL, DECODE = "prefill", "decode"
#: Background mapper modes (see the module docstring).
MAPPER_MODES = ("off", "inline", "thread")


class Clock:
    """The loop's clock, in seconds; the loop advances it by model steps, the metered
    arena by the cost of arena operations."""

    __slots__ = ("now",)

    def __init__(self, start_s: float = 0.0) -> None:
        self.now = float(start_s)


class MeteredArena:
    """An arena whose memory operations are charged to a clock (see the module docstring).

    Args:
        arena: a :class:`arena.PagedArena`; its pools ``"prefill"`` and ``"decode"`` are used.
        cap_bytes: the most memory the pools may lease in all (whole chunks; default the
            arena's reserved range). ValueError when below one chunk.
        cost_model: a :class:`~scheduler.costs.CostModel` or ``(ArenaOp) -> seconds``
            (default: measured wall-clock time).
        counters: the run's :class:`Counters` (arena fields are updated here).
        clock: the :class:`Clock` charged.
        on_event: ``(event) -> None``, called with ``EVENT_MAP`` / ``EVENT_UNMAP`` after an
            operation that mapped / unmapped chunks.
        mapper: one of :data:`MAPPER_MODES` (default "off": every driver call on the
            caller's thread, at once).
        mapper_slack: the hysteresis band above the spare target, as a share of it (at
            least one chunk): spare blocks are unmapped only past ``target * (1 + slack)``.
    """

    def __init__(self, arena: PagedArena, *, cap_bytes: int | None = None,
                 cost_model: CostModel | Callable[[ArenaOp], float] | None = None,
                 counters: Counters | None = None, clock: Clock | None = None,
                 on_event: Callable[[int], None] | None = None, mapper: str = "off",
                 mapper_slack: float = 0.5) -> None:
        if not isinstance(arena, PagedArena):
            raise TypeError(f"arena must be a PagedArena, got {type(arena).__name__}")
        if mapper not in MAPPER_MODES:
            raise ValueError(f"mapper must be one of {MAPPER_MODES}, got {mapper!r}")
        if not (isinstance(mapper_slack, (int, float)) and 0 <= mapper_slack < math.inf):
            raise ValueError(f"mapper_slack must be a finite number >= 0, got {mapper_slack!r}")
        self.arena = arena
        self.spec = arena.spec
        self.tables = arena.tables
        self.cost_model = as_cost_model(cost_model)
        self.counters = counters if counters is not None else Counters()
        self.clock = clock if clock is not None else Clock()
        self._on_event = on_event
        self.pools = {PREFILL: arena.pool(PREFILL), DECODE: arena.pool(DECODE)}
        self.block_bytes = self.spec.block_bytes
        self.chunk_bytes = arena.chunk_bytes
        self.blocks_per_chunk = arena.blocks_per_chunk
        cap = cap_bytes if cap_bytes is not None else arena.num_chunks * arena.chunk_bytes
        blocks = min(cap // arena.chunk_bytes, arena.num_chunks) * self.blocks_per_chunk
        if blocks < self.blocks_per_chunk:
            raise ValueError(f"cap_bytes={cap} is below one chunk ({arena.chunk_bytes} B)")
        self._cap_blocks = blocks
        if mapper == "inline" and isinstance(self.cost_model, WallClockCost):
            raise ValueError("mapper='inline' models a mapper thread and needs a modeled cost "
                             "model (its work runs on the calling thread); use 'thread' with "
                             "wall-clock costs")
        self.mapper_mode = mapper
        self.mapper_slack = float(mapper_slack)
        #: blocks allocated so far (every pool): what policies learn their prefetch from
        self.blocks_allocated = 0
        # inline: when the modeled mapper's queued driver work ends, on the loop's clock
        self._busy_until = self.clock.now
        # inline: (clock s when mapped, blocks) of spare the mapper is still mapping
        self._pending_spare: deque[tuple[float, int]] = deque()
        # inline: one batch of the mapper thread (it takes the arena lock per batch)
        self._batch_s = float(self.cost_model(ArenaOp(
            "premap", 0.0, chunks_mapped=BackgroundMapper.DEFAULT_CHUNKS_PER_LOCK,
            chunk_bytes=arena.chunk_bytes))) if mapper == "inline" else 0.0
        self._mapper: BackgroundMapper | None = None
        self._mapper_seen = (0.0, 0, 0)
        if mapper == "thread":
            self._mapper = BackgroundMapper(arena)

    # ------------------------------------------------------------------ figures (blocks)
    @property
    def cap_blocks(self) -> int:
        """The most blocks the pools may lease in all (whole chunks)."""
        return self._cap_blocks

    @property
    def cap_bytes(self) -> int:
        """:attr:`cap_blocks` in bytes."""
        return self._cap_blocks * self.block_bytes

    def lower_cap(self, blocks: int) -> None:
        """Never lease more than ``blocks`` from now on (a policy that maps a fixed amount
        once, like ``static``). ValueError if it would raise the cap or drop below the
        leases."""
        blocks = int(blocks)
        if not self.arena.leased_blocks <= blocks <= self._cap_blocks:
            raise ValueError(f"blocks must be in [{self.arena.leased_blocks}, "
                             f"{self._cap_blocks}], got {blocks}")
        self._cap_blocks = blocks

    @property
    def mapped_blocks(self) -> int:
        """Blocks mapped now."""
        return self.arena.mapped_blocks

    @property
    def leased_blocks(self) -> int:
        """The two pools' leases together."""
        return self.arena.leased_blocks

    def lease(self, pool: str) -> int:
        """Blocks ``pool`` ("prefill" or "decode") leases now."""
        return self.pools[pool].lease

    def owned(self, pool: str) -> int:
        """Blocks ``pool`` holds now."""
        return self.pools[pool].num_owned

    @property
    def spare_blocks(self) -> int:
        """Mapped blocks no lease covers (:attr:`arena.PagedArena.spare_blocks`)."""
        return self.arena.spare_blocks

    def unused_lease(self, pool: str) -> int:
        """Blocks of ``pool``'s lease it does not hold: what it can allocate without growing."""
        p = self.pools[pool]
        return p.lease - p.num_owned

    def limit_blocks(self) -> int:
        """Blocks the pools could ever lease: the cap, or less where the device cannot map
        that much (its free memory plus what is mapped now)."""
        a = self.arena
        device = (a.mapped_bytes + a.backend.free_bytes()) // a.chunk_bytes * a.blocks_per_chunk
        return min(self._cap_blocks, device)

    def supply_blocks(self) -> int:
        """Blocks the two pools may lease in all now: their leases plus mapped-unleased
        blocks plus what the device can still map, under the cap."""
        a = self.arena
        return min(self._cap_blocks, a.leased_blocks + a.available_blocks())

    def free_blocks(self) -> int:
        """Blocks a lease could still grow by now: :meth:`supply_blocks` less the leases."""
        return self.supply_blocks() - self.arena.leased_blocks

    # ------------------------------------------------------------------ charged operations
    def resize(self, pool: str, target: int, kind: str = "resize") -> None:
        """Set ``pool``'s lease to ``target`` blocks (a raise may map chunks; a lowering
        maps and unmaps nothing). Raises ArenaOutOfMemory with nothing changed when the
        device cannot supply a raise, ValueError below what the pool holds. The cap is the
        caller's to respect (see :meth:`grow`)."""
        p = self.pools[pool]
        target = int(target)
        if target == p.lease:
            return
        a = self.arena
        if target > p.lease and self.mapper_mode == "inline":
            # The raise takes spare blocks (which the mapper may still be mapping) and maps
            # the rest itself (the driver may be busy with the mapper's batch).
            spare = a.spare_blocks
            self._wait_for_spare(min(target - p.lease, spare))
            if target - p.lease > spare:
                self._wait_for_driver()
        t0 = time.perf_counter()
        # Under the lock: a mapper thread must not unmap the spare between the check and
        # the raise (the raise would then map, uncounted).
        with a.lock:
            if target < p.lease or target - p.lease <= a.spare_blocks:
                # Cheap path: a lowering, or a raise inside mapped memory, maps nothing, so
                # no arena statistics are needed (static's every grow takes it).
                p.resize(target)
                self._charge(ArenaOp("lease", time.perf_counter() - t0))
                return
            if kind == "resize":
                self.counters.map_misses += 1
            self._measured(kind, lambda: p.resize(target), t0=t0)

    def lower_to(self, pool: str, target: int) -> None:
        """Lower ``pool``'s lease to ``max(target, blocks it holds)`` (no-op if already
        at or below)."""
        p = self.pools[pool]
        t = max(int(target), p.num_owned)
        if t < p.lease:
            self.resize(pool, t)

    def grow(self, pool: str, n: int) -> bool:
        """Raise ``pool``'s lease by ``n`` blocks if the cap and the device allow; False
        (nothing changed) otherwise."""
        if self.arena.leased_blocks + n > self._cap_blocks:
            return False
        try:
            self.resize(pool, self.pools[pool].lease + n)
        except ArenaOutOfMemory:
            return False
        return True

    def set_leases(self, prefill: int, decode: int) -> None:
        """Move both leases towards the targets: lower first (what one gives, the other
        may take), then raise under the cap; where the device gives less than it said,
        take what there is. Never below what a pool holds."""
        pools = ((PREFILL, prefill), (DECODE, decode))
        for name, t in pools:
            self.lower_to(name, t)
        a = self.arena
        for name, t in pools:
            p = self.pools[name]
            if t > p.lease:
                t = min(t, p.lease + self._cap_blocks - a.leased_blocks)
                try:
                    self.resize(name, t)
                except ArenaOutOfMemory:
                    t = min(t, p.lease + a.available_blocks())
                    try:
                        self.resize(name, t)
                    except ArenaOutOfMemory:
                        pass

    def shrink(self, keep_blocks: int = 0) -> None:
        """Compact on the device and unmap every chunk above the leases plus up to
        ``keep_blocks`` mapped-unleased blocks (kept mapped for what comes next). With a
        background mapper the emptied chunks are its to unmap (at the next
        :meth:`map_ahead`)."""
        a = self.arena
        if self.mapper_mode == "inline":
            self._wait_for_driver()
        # The kept blocks ride on the prefill lease through the shrink, so the chunks that
        # hold them stay mapped; the lease drops back after (lowering unmaps nothing).
        extra = max(0, min(int(keep_blocks), a.spare_blocks))
        p = self.pools[PREFILL]
        base = p.lease
        self.resize(PREFILL, base + extra)
        # With a mapper the compaction only empties the top chunks; the mapper gives them
        # back at the next launch, off the step loop.
        unmap = self.mapper_mode == "off"
        try:
            self._measured("shrink", lambda: a.shrink(unmap))
        finally:
            self.resize(PREFILL, base)
        self.counters.shrinks += 1

    def release_free_chunks(self) -> int:
        """Unmap every chunk that holds no block, while the mapped blocks still cover the
        leases (no compaction). Returns the chunks unmapped. With a background mapper the
        unmaps are deferred to it (at the next :meth:`map_ahead`, in batches, once the
        spare passes the top of its band, down to its target) and this returns 0."""
        self.counters.release_calls += 1
        if self.mapper_mode != "off":
            return 0
        return self._measured("release", self.arena.release_free_chunks)

    # ------------------------------------------------------------------ background mapper
    def map_ahead(self, target_blocks: int, high_blocks: int | None = None) -> None:
        """Tell the background mapper what the next step is expected to take: keep at least
        ``target_blocks`` spare (mapped, unleased) blocks, and unmap free chunks once the
        spare exceeds ``high_blocks`` (default: the target plus the hysteresis band,
        :attr:`mapper_slack`), down to the target. The target is clipped to the cap. Called
        when a step is launched: the work overlaps it. A no-op without a mapper."""
        mode = self.mapper_mode
        if mode == "off":
            return
        a = self.arena
        target = max(0, min(int(target_blocks), self._cap_blocks - a.leased_blocks))
        high = (target + max(self.blocks_per_chunk, math.ceil(self.mapper_slack * target))
                if high_blocks is None else max(int(high_blocks), target))
        if mode == "thread":
            self._sync_thread_counters()
            self._mapper.set_target(target, high, self._cap_blocks)
            return
        spare = a.spare_blocks
        if spare < target:
            self._measured("premap", lambda: a.map_spare(target), background=True)
        elif spare > high:
            self._measured("release", lambda: a.release_free_chunks(keep_blocks=target),
                           background=True)

    def release_all(self) -> None:
        """Give back every free chunk (the engine went idle): through the mapper when there
        is one, else at once."""
        if self.mapper_mode == "off":
            self._measured("release", self.arena.release_free_chunks)
        else:
            self.map_ahead(0, 0)

    def close_mapper(self) -> None:
        """Stop a ``"thread"`` mapper (after its current batch) and book its last work."""
        if self._mapper is not None:
            self._mapper.close()
            self._sync_thread_counters()

    def sync_background(self) -> None:
        """Book a ``"thread"`` mapper's work so far into the counters (no-op otherwise)."""
        if self._mapper is not None:
            self._sync_thread_counters()

    def _wait_for_spare(self, n: int) -> None:
        """Inline mapper: ``n`` spare blocks are about to be leased; wait (on the clock,
        critical path) until enough of the spare the mapper is still mapping is mapped."""
        pending = self._pending_spare
        now = self.clock.now
        while pending and pending[0][0] <= now:
            pending.popleft()
        if not pending or n <= 0:
            return
        ready = self.arena.spare_blocks - sum(b for _, b in pending)
        until = now
        for t, b in pending:
            if ready >= n:
                break
            ready += b
            until = t
        self._wait(until - now)

    def _wait_for_driver(self) -> None:
        """Inline mapper: the loop makes a driver call of its own; the mapper's batch in
        flight (at most ``chunks_per_lock`` chunks) finishes first."""
        self._wait(min(self._busy_until - self.clock.now, self._batch_s))

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self.clock.now += seconds
            self.counters.mapper_wait_s += seconds
            self.counters.arena_time_s += seconds

    def _sync_thread_counters(self) -> None:
        m = self._mapper
        busy, mapped, unmapped = m.busy_s, m.chunks_mapped, m.chunks_unmapped
        b0, m0, u0 = self._mapper_seen
        self._mapper_seen = (busy, mapped, unmapped)
        c = self.counters
        c.time_background_s += busy - b0
        c.map_calls += mapped - m0
        c.unmap_calls += unmapped - u0
        c.background_maps += int(mapped > m0)
        c.background_unmaps += int(unmapped > u0)

    def swap_out(self, block_ids: np.ndarray) -> Any:
        """A host copy of the blocks (see :meth:`arena.PagedArena.swap_out`); charged as
        ``len(block_ids)`` blocks over the host link."""
        n = int(np.asarray(block_ids).size) * self.block_bytes
        data = self._measured("swap_out", lambda: self.arena.swap_out(block_ids),
                              bytes_copied=n)
        self.counters.swap_out_bytes += n
        return data

    def swap_in(self, data: Any, block_ids: np.ndarray) -> None:
        """Write a host copy back into ``block_ids``; charged like :meth:`swap_out`."""
        n = int(np.asarray(block_ids).size) * self.block_bytes
        self._measured("swap_in", lambda: self.arena.swap_in(data, block_ids),
                       bytes_copied=n)
        self.counters.swap_in_bytes += n

    # ------------------------------------------------------------------ block bookkeeping
    def open_sequence(self, seq_id: int, pool: str, n: int) -> np.ndarray:
        """Start block-table row ``seq_id`` with ``n`` blocks allocated from ``pool``'s
        lease (the caller checked :meth:`unused_lease`). Returns the block ids."""
        ids = self.pools[pool].allocate(n)
        self.tables.add(seq_id)
        self.tables.append(seq_id, ids)
        self.blocks_allocated += int(n)
        return ids

    def extend_sequence(self, seq_id: int, pool: str, n: int) -> None:
        """Allocate ``n`` more blocks from ``pool``'s lease to row ``seq_id``."""
        self.tables.append(seq_id, self.pools[pool].allocate(n))
        self.blocks_allocated += int(n)

    def close_sequence(self, seq_id: int, pool: str) -> np.ndarray:
        """Remove row ``seq_id`` and free its blocks in ``pool`` (the lease stays).
        Returns the freed block ids."""
        ids = self.tables.remove(seq_id)
        self.pools[pool].free(ids)
        return ids

    def sequence_blocks(self, seq_id: int) -> np.ndarray:
        """The block ids of row ``seq_id``."""
        return self.tables.blocks(seq_id)

    def hand_off(self, seq_id: int) -> None:
        """Move row ``seq_id``'s blocks (and as much lease) from prefill to decode: no
        byte is copied."""
        self.pools[PREFILL].transfer(self.tables.blocks(seq_id), self.pools[DECODE])

    # ------------------------------------------------------------------ metering
    def _measured(self, kind: str, fn: Callable[[], Any], *, bytes_copied: int = 0,
                  background: bool = False, t0: float | None = None) -> Any:
        """Run an arena call; charge what it mapped, unmapped, moved and copied (to the
        background mapper's account with ``background``). The wall time runs from ``t0``
        (default: now, before taking the arena lock, so a wait behind a mapper thread's
        batch is the caller's time too)."""
        a = self.arena
        if t0 is None:
            t0 = time.perf_counter()
        # Under the lock: a mapper thread's calls must not land between the two readings.
        with a.lock:
            before = a.stats()
            try:
                return fn()
            finally:
                wall = time.perf_counter() - t0
                after = a.stats()
                self._charge(ArenaOp(kind, wall,
                                     chunks_mapped=after["map_calls"] - before["map_calls"],
                                     chunks_unmapped=after["unmap_calls"] - before["unmap_calls"],
                                     chunk_bytes=a.chunk_bytes,
                                     blocks_moved=after["moves"] - before["moves"],
                                     bytes_moved=after["bytes_moved"] - before["bytes_moved"],
                                     bytes_copied=bytes_copied), background=background)

    def _charge(self, op: ArenaOp, background: bool = False) -> None:
        cost = float(self.cost_model(op))
        c = self.counters
        if op.kind == "static":
            # Start-up mapping happens before the engine serves: reported apart, and no
            # request waits on it.
            c.startup_map_s += cost
            c.map_calls += op.chunks_mapped
            if self._on_event is not None and op.chunks_mapped:
                self._on_event(EVENT_MAP)
            return
        if background:
            # Off the critical path: the mapper's queue grows, the loop's clock does not.
            c.time_background_s += cost
            c.arena_wall_s += op.wall_s
            c.map_calls += op.chunks_mapped
            c.unmap_calls += op.chunks_unmapped
            c.background_maps += int(op.chunks_mapped > 0)
            c.background_unmaps += int(op.chunks_unmapped > 0)
            now = self.clock.now
            if op.chunks_mapped:
                # Maps go ahead of queued unmaps (the thread takes a new target between
                # batches): they start once the batch in flight is done.
                start = now + min(max(self._busy_until - now, 0.0), self._batch_s)
                self._pending_spare.append((start + cost,
                                            op.chunks_mapped * self.blocks_per_chunk))
            self._busy_until = max(self._busy_until, now) + cost
            if self._on_event is not None:
                if op.chunks_mapped:
                    self._on_event(EVENT_MAP)
                if op.chunks_unmapped:
                    self._on_event(EVENT_UNMAP)
            return
        c.arena_time_s += cost
        c.arena_wall_s += op.wall_s
        if cost:
            for part, s in self.cost_model.breakdown(op, cost).items():
                setattr(c, _PART_COUNTER[part], getattr(c, _PART_COUNTER[part]) + s)
        c.map_calls += op.chunks_mapped
        c.unmap_calls += op.chunks_unmapped
        c.compaction_moves += op.blocks_moved
        c.compaction_bytes += op.bytes_moved
        self.clock.now += cost
        if self._on_event is not None:
            if op.chunks_mapped:
                self._on_event(EVENT_MAP)
            if op.chunks_unmapped:
                self._on_event(EVENT_UNMAP)


_PART_COUNTER = {p: f"time_{p}_s" for p in COST_PARTS}
