"""The metered arena: every memory operation of the scheduler goes through it and is
charged; leases, cap, shrink with a kept reserve, swaps; and the policy boundary."""
import sys

import numpy as np
import pytest

from arena.pool import Pool
from scheduler import ModeledGPUCost, Request
from scheduler.costs import COST_PARTS, ArenaOp, CostModel, WallClockCost, as_cost_model
from scheduler.metered import DECODE, PREFILL, Clock, MeteredArena
from scheduler.metrics import EVENT_MAP, EVENT_UNMAP, Counters
from tests.scheduler_helpers import (PAGE, OneTokenLeft, make_arena, make_loop, run_checked,
                                     workload)

COST = ModeledGPUCost(map_s_per_chunk=1e-3, unmap_s_per_chunk=2e-3, device_bandwidth=1e6,
                      host_bandwidth=1e5, op_overhead_s=1e-4)


def metered(chunks=16, cap_chunks=None, cost=COST):
    events = []
    m = MeteredArena(make_arena(chunks), cap_bytes=None if cap_chunks is None
                     else cap_chunks * PAGE, cost_model=cost, counters=Counters(),
                     clock=Clock(10.0), on_event=events.append)
    return m, events


def test_raising_a_lease_maps_and_charges_the_clock():
    m, events = metered()
    bpc = m.blocks_per_chunk
    m.resize(PREFILL, 2 * bpc)
    c = m.counters
    assert m.mapped_blocks == 2 * bpc and c.map_calls == 2
    assert m.clock.now == pytest.approx(10.0 + 2e-3 + 1e-4)
    assert c.arena_time_s == pytest.approx(2e-3 + 1e-4)
    assert c.time_map_s == pytest.approx(c.arena_time_s) and events == [EVENT_MAP]
    # Lowering maps nothing and costs nothing under the modeled cost.
    m.resize(PREFILL, bpc)
    assert m.lease(PREFILL) == bpc and m.mapped_blocks == 2 * bpc
    assert m.clock.now == pytest.approx(10.0 + 2e-3 + 1e-4) and c.time_lease_s == 0.0


def test_grow_respects_the_cap_and_changes_nothing_when_refused():
    m, _ = metered(cap_chunks=2)
    bpc = m.blocks_per_chunk
    assert m.cap_blocks == 2 * bpc
    assert m.grow(DECODE, 2 * bpc)
    before = (m.lease(DECODE), m.mapped_blocks, m.clock.now, m.counters.map_calls)
    assert not m.grow(PREFILL, 1)
    assert (m.lease(DECODE), m.mapped_blocks, m.clock.now, m.counters.map_calls) == before
    assert m.lease(PREFILL) == 0 and m.free_blocks() == 0


def test_a_device_that_refuses_leaves_everything_as_it_was():
    arena = make_arena(16, device_chunks=3)
    m = MeteredArena(arena, cost_model=COST)
    assert m.limit_blocks() == 3 * m.blocks_per_chunk
    assert not m.grow(PREFILL, 4 * m.blocks_per_chunk)
    assert m.lease(PREFILL) == 0 and m.mapped_blocks == 0 and m.counters.arena_time_s == 0


def test_set_leases_lowers_first_and_takes_what_the_cap_leaves():
    m, _ = metered(cap_chunks=3)
    bpc = m.blocks_per_chunk
    m.resize(PREFILL, 2 * bpc)
    m.open_sequence(7, PREFILL, bpc)          # prefill holds one chunk's blocks
    m.set_leases(0, 3 * bpc)                  # prefill can only drop to what it holds
    assert m.lease(PREFILL) == bpc and m.lease(DECODE) == 2 * bpc
    assert m.leased_blocks <= m.cap_blocks


def test_shrink_keeps_the_reserve_mapped_and_restores_the_lease():
    m, events = metered()
    bpc = m.blocks_per_chunk
    m.resize(PREFILL, 4 * bpc)
    m.open_sequence(1, PREFILL, 1)
    m.resize(PREFILL, 1)
    m.shrink(keep_blocks=bpc + 1)             # 1 leased + 5 kept: two chunks stay mapped
    assert m.mapped_blocks == 2 * bpc and m.lease(PREFILL) == 1
    assert m.counters.shrinks == 1 and m.counters.unmap_calls == 2
    assert events[-1] == EVENT_UNMAP
    m.shrink()
    assert m.mapped_blocks == bpc and m.counters.unmap_calls == 3
    with pytest.raises(ValueError):
        m.lower_cap(0)                         # below the leases
    with pytest.raises(ValueError):
        m.lower_cap(m.cap_blocks + 1)          # a raise


def test_swaps_are_charged_over_the_host_link():
    m, _ = metered()
    m.resize(DECODE, 2)
    ids = m.open_sequence(3, DECODE, 2)
    data = m.swap_out(m.sequence_blocks(3))
    m.close_sequence(3, DECODE)
    n = 2 * m.block_bytes
    assert m.counters.swap_out_bytes == n
    assert m.counters.time_swap_s == pytest.approx(n / 1e5 + 1e-4)
    ids2 = m.open_sequence(3, DECODE, 2)
    m.swap_in(data, ids2)
    assert m.counters.swap_in_bytes == n and ids.size == ids2.size


def test_cost_models_resolve_and_split():
    assert isinstance(as_cost_model(None), WallClockCost)
    plain = as_cost_model(lambda op: 0.5)
    assert isinstance(plain, CostModel)
    op = ArenaOp("release", 0.1, chunks_unmapped=1)
    assert plain(op) == 0.5 and plain.breakdown(op, 0.5) == {"unmap": 0.5}
    assert WallClockCost().breakdown(ArenaOp("lease", 0.2), 0.2) == {"lease": 0.2}
    with pytest.raises(TypeError, match="cost_model"):
        as_cost_model(3)
    parts = COST.breakdown(ArenaOp("resize", 0, chunks_mapped=2), COST(ArenaOp(
        "resize", 0, chunks_mapped=2)))
    assert set(parts) <= set(COST_PARTS) and sum(parts.values()) == pytest.approx(2.1e-3)


class _Spy:
    """Records which module called each Pool method that changes leases or holdings."""

    def __init__(self, monkeypatch):
        self.callers = set()
        for name in ("resize", "allocate", "free", "transfer"):
            orig = getattr(Pool, name)

            def wrapped(pool, *a, _orig=orig, **kw):
                self.callers.add(sys._getframe(1).f_globals["__name__"])
                return _orig(pool, *a, **kw)

            monkeypatch.setattr(Pool, name, wrapped)


@pytest.mark.parametrize("memory", ["static", "on-demand", "windowed"])
def test_every_pool_change_goes_through_the_metered_arena(memory, monkeypatch):
    spy = _Spy(monkeypatch)
    arena = make_arena()
    # A tight cap and a predictor that under-predicts: grows, preemptions, shrinks.
    loop = make_loop(arena, memory=memory, cap_bytes=4 * PAGE, static_bytes=4 * PAGE,
                     preemption="swap", predictor=OneTokenLeft())
    reqs = workload(30, seed=3, max_prompt=30, max_out=30)
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    assert spy.callers == {"scheduler.metered"}
    c = m.counters
    # Nothing mapped or unmapped behind the meter's back, and every charge is split.
    st = arena.stats()
    assert (st["map_calls"], st["unmap_calls"]) == (c.map_calls, c.unmap_calls)
    assert sum(getattr(c, f"time_{p}_s") for p in COST_PARTS) == pytest.approx(c.arena_time_s)
    assert c.preemptions > 0


def test_policies_get_a_read_only_view_not_the_loop():
    import scheduler.memory as memory

    assert "EngineLoop" not in open(memory.__file__).read()
    loop = make_loop(make_arena(), memory="windowed")
    assert not hasattr(loop.memory, "loop")
    v = loop.view
    loop.submit(Request(0, 8, 4, 4))
    loop.step()
    assert v.num_prefill + v.num_decode == 1 and v.now == loop.now
    with pytest.raises(AttributeError):
        v.num_waiting = 3
    np.testing.assert_array_equal(v.decode_set().ids, [r.req_id for r in loop.decode_requests])
