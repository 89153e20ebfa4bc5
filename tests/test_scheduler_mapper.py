"""The loop's background mapper (inline model and real thread), the learned prefetch,
prompt blocks allocated per chunk, and static's start-up mapping kept off the clock."""
from __future__ import annotations

import pytest
import torch

from arena import KVSpec
from scheduler import EngineLoop, LatencyModel, LoopConfig, Request
from scheduler.costs import wall_clock_cost
from scheduler.metered import MeteredArena
from scheduler.prefetch import PrefetchLearner
from scheduler_helpers import LAT, make_arena, make_loop, run_checked, workload


def _critical(c) -> float:
    return c.time_map_s + c.time_unmap_s + c.time_compact_s + c.mapper_wait_s


@pytest.mark.parametrize("memory", ["on-demand", "windowed"])
def test_inline_mapper_takes_driver_time_off_the_step_loop(memory):
    runs = {}
    for mapper in ("off", "inline"):
        reqs = workload(40, seed=3)
        loop = make_loop(make_arena(128), memory=memory, mapper=mapper)
        loop.submit_many(reqs)
        m = run_checked(loop, reqs)
        runs[mapper] = (m, [r.generated for r in reqs])
    off, inline = runs["off"][0].counters, runs["inline"][0].counters
    assert runs["off"][1] == runs["inline"][1]          # same tokens for every request
    assert off.time_background_s == 0 and inline.time_background_s > 0
    assert inline.map_misses < off.map_misses
    assert _critical(inline) < 0.5 * _critical(off)
    assert inline.background_maps > 0 and inline.background_unmaps > 0
    assert inline.finished == off.finished == 40


def test_decode_growth_is_mapped_ahead_exactly():
    """Everything admitted at t=0, then only decode growth: after the admissions' own
    misses, the lookahead maps every block a step opens before the step needs it."""
    reqs = [Request(i, 3, 60, 60) for i in range(6)]
    loop = make_loop(make_arena(128), memory="on-demand", mapper="inline",
                     prefetch_quantile=0.0)
    loop.submit_many(reqs)
    loop.step()
    first = loop.metrics.counters.map_misses
    assert first >= 1                        # the admissions: nothing was foreseen
    m = run_checked(loop, reqs)
    assert m.counters.map_misses == first    # every later block was mapped ahead
    assert m.counters.map_calls > 2 * first
    ref = make_loop(make_arena(128), memory="on-demand")
    reqs2 = [Request(i, 3, 60, 60) for i in range(6)]
    ref.submit_many(reqs2)
    assert run_checked(ref, reqs2).counters.map_misses > 5


def test_the_mapper_is_waited_for_when_its_work_outlasts_the_step():
    """Steps of 1 ns cannot hide 40 us map calls: the loop waits, and the wait is on the
    critical path and on the clock."""
    reqs = [Request(i, 3, 40, 40) for i in range(4)]
    loop = make_loop(make_arena(128), step=lambda b: 1e-9, memory="on-demand",
                     mapper="inline")
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    c = m.counters
    assert c.mapper_wait_s > 0
    assert c.model_time_s + c.arena_time_s + c.time_swap_s >= m.end_s - 1e-12


def test_inline_mapper_needs_a_modeled_cost():
    with pytest.raises(ValueError, match="mapper='inline'"):
        MeteredArena(make_arena(8), mapper="inline", cost_model=wall_clock_cost)
    with pytest.raises(ValueError, match="mapper must be"):
        MeteredArena(make_arena(8), mapper="later")
    with pytest.raises(ValueError, match="mapper"):
        LoopConfig(mapper="sometimes")
    with pytest.raises(ValueError, match="prefetch_quantile"):
        LoopConfig(prefetch_quantile=1.5)
    with pytest.raises(ValueError, match="mapper_slack"):
        MeteredArena(make_arena(8), mapper="off", mapper_slack=-1)


def test_thread_mapper_runs_a_workload_to_the_end():
    reqs = workload(30, seed=5)
    arena = make_arena(128)
    loop = EngineLoop(arena, lambda b: 2e-4, LatencyModel(LAT),
                      LoopConfig(memory="on-demand", token_budget=32, mapper="thread"),
                      cost_model=wall_clock_cost)
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    loop.metered.close_mapper()
    c = m.counters
    assert c.finished == 30
    assert c.time_background_s > 0 and c.map_calls >= c.map_misses
    arena.close()


def test_prefetch_learner_answers_a_quantile_of_recent_surprises():
    p = PrefetchLearner(0.5, history=4)
    assert p.allowance() == 0
    p.observe(0)
    p.observe(-3)
    assert p.allowance() == 0                  # nothing unforeseen yet
    for x in (10, 2, 6):
        p.observe(x)
    assert p.allowance() == 6
    for x in (1, 1, 1):
        p.observe(x)                           # the 10 and the 2 leave the history
    assert p.allowance() == 1
    assert PrefetchLearner(0.0).allowance() == 0
    q = PrefetchLearner(1.0)
    q.observe(7)
    q.observe(3)
    assert q.allowance() == 7
    with pytest.raises(ValueError, match="quantile"):
        PrefetchLearner(-0.1)
    with pytest.raises(ValueError, match="history"):
        PrefetchLearner(0.5, history=0)


def test_prompt_blocks_are_allocated_chunk_by_chunk():
    loop = make_loop(make_arena(64), memory="on-demand", token_budget=8)
    r = Request(0, 40, 4, 4)                 # 40 tokens in 8-token chunks, 4-token blocks
    loop.submit(r)
    loop.step()
    assert r.kv_len == 8 and r.num_blocks == 2       # not the prompt's 10 blocks
    loop.step()
    assert r.kv_len == 16 and r.num_blocks == 4
    loop.run()
    assert r.generated == 4


def test_admission_counts_what_earlier_prompts_still_have_to_allocate():
    """Two prompts of 8 blocks each under a 12-block cap: neither has allocated when the
    second is considered, but the first's 8 blocks are spoken for, so it waits."""
    arena = make_arena(64)
    loop = make_loop(arena, memory="on-demand", token_budget=64, cap_bytes=3 * 4096,
                     max_prefill_tokens=64)
    a, b = Request(0, 32, 2, 2), Request(1, 32, 2, 2)
    loop.submit_many([a, b])
    loop.step()
    assert a.admit_s == 0.0 and b.phase.name == "WAITING"
    loop.run()
    assert a.generated == b.generated == 2
    assert loop.metrics.counters.preemptions == 0


def test_static_start_up_mapping_is_not_charged_to_serving():
    loop = make_loop(make_arena(64), memory="static")
    c = loop.metrics.counters
    assert loop.now == 0.0 and c.arena_time_s == 0.0
    assert c.startup_map_s > 0 and c.map_calls == 64


def test_windowed_never_compacts_when_a_chunk_holds_one_block():
    """A 4 KiB block in a 4 KiB chunk: every free block is a free chunk, unmapped where it
    lies; the plan's window-end shrinks become releases in place."""
    spec = KVSpec(2, 2, 16, block_size=16, dtype=torch.float16)   # 16 x 256 B = one page
    for mapper in ("off", "inline"):
        arena = make_arena(256, spec=spec)
        assert arena.blocks_per_chunk == 1
        reqs = workload(40, seed=9, max_prompt=60, max_out=60)
        loop = make_loop(arena, memory="windowed", mapper=mapper, token_budget=64)
        loop.submit_many(reqs)
        c = run_checked(loop, reqs).counters
        assert c.finished == 40
        assert c.compaction_moves == 0 and c.shrinks == 0
        assert c.unmap_calls > 0 and arena.mapped_blocks == 0


def test_budgets_lower_unused_lease_and_map_nothing():
    """Decision.budgets never raises a lease or maps; it drops unused lease down to the
    budget (never below what a pool holds)."""
    from scheduler.decision import Decision

    loop = make_loop(make_arena(64), memory="on-demand")
    m = loop.metered
    m.resize("prefill", 10)
    m.open_sequence(99, "prefill", 3)
    mapped = m.mapped_blocks
    loop.carry_out(Decision(budgets=(40, 40)))
    assert m.lease("prefill") == 10 and m.lease("decode") == 0 and m.mapped_blocks == mapped
    loop.carry_out(Decision(budgets=(0, 0)))
    assert m.lease("prefill") == 3 and m.mapped_blocks == mapped


def test_inline_mapper_waits_only_for_what_a_raise_needs():
    """A raise into spare the mapper is still mapping waits for that map; a raise into
    spare mapped long ago does not wait behind the mapper's unmaps; a miss waits at most
    one of the mapper's batches for the driver."""
    from scheduler.costs import ModeledGPUCost

    cost = ModeledGPUCost()
    m = MeteredArena(make_arena(64), mapper="inline", cost_model=cost)
    bpc = m.blocks_per_chunk
    m.map_ahead(10 * bpc)                       # 10 chunks queued at t = 0
    assert m.clock.now == 0 and m.arena.spare_blocks == 10 * bpc
    m.resize("prefill", bpc)                    # needs them: waits for the map
    first = m.clock.now
    assert first == pytest.approx(10 * cost.map_s_per_chunk + cost.op_overhead_s)
    m.resize("prefill", 0)
    m.clock.now += 1.0
    m.map_ahead(2 * bpc, 2 * bpc)               # 8 chunks to unmap, in the background
    assert m.arena.spare_blocks == 2 * bpc and m._busy_until > m.clock.now
    t = m.clock.now
    m.resize("prefill", 2 * bpc)                # spare mapped long ago: no wait
    assert m.clock.now == t
    m.resize("prefill", 3 * bpc)                # a miss: the driver after one batch
    waited = m.counters.mapper_wait_s - first
    assert 0 < waited <= m._batch_s
    assert m.counters.map_misses == 1
