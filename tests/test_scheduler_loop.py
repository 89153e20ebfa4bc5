"""The engine loop on the host backend: every policy end to end, the cap, lease misses,
batches, the clock, and random workloads with invariants (hypothesis)."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import (ArenaOp, EngineLoop, LatencyModel, LoopConfig, ModeledGPUCost,
                       PlannerConfig, Request, latency_step)
from scheduler.request import Phase
from tests.scheduler_helpers import (LAT, PAGE, OneTokenLeft, make_arena, make_loop,
                                     run_checked, workload)


@pytest.mark.parametrize("memory", ["static", "on-demand", "windowed"])
def test_every_policy_finishes_every_request(memory):
    arena = make_arena()
    loop = make_loop(arena, memory=memory, predictor="empirical", cap_bytes=16 * PAGE,
                     static_bytes=12 * PAGE)
    reqs = workload(40, seed=1)
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    assert all(r.phase == Phase.FINISHED and r.generated == r.target for r in reqs)
    assert m.counters.finished == 40 and len(m.requests) == 40
    assert m.counters.decode_tokens + m.counters.prefills_completed == sum(r.target for r in reqs)
    rec = m.request_arrays()
    assert np.all(rec["ttft_s"] > 0) and np.all(rec["finish_s"] >= rec["first_token_s"])
    assert sorted(rec["req_id"].tolist()) == list(range(40))
    assert m.end_s > 0 and m.throughput_tokens_per_s() > 0
    t = m.timeline.arrays()
    assert np.all(np.diff(t["t_s"]) >= 0) and np.all(t["mapped_bytes"] <= 16 * PAGE)
    if memory == "static":
        assert m.counters.unmap_calls == 0 and m.counters.map_calls == 12
        assert np.all(t["mapped_bytes"][1:] == 12 * PAGE)
    elif memory == "on-demand":
        assert m.counters.unmap_calls > 0 and m.counters.release_calls > 0
        assert m.counters.shrinks == 0 and m.counters.compaction_moves == 0
    else:
        assert m.counters.windows > 0 and m.counters.plans >= m.counters.windows
        assert m.counters.shrinks > 0
    # Everything went back to the pools; on-demand and windowed give it back to the device.
    assert arena.used_blocks == 0
    if memory == "windowed":
        loop.carry_out(loop.memory.plan_window(loop.view))
        assert arena.mapped_blocks == 0


@pytest.mark.parametrize("memory", ["static", "on-demand", "windowed"])
def test_the_cap_is_never_exceeded_and_forces_preemption(memory):
    arena = make_arena(chunks=64)
    cap = 5 * PAGE   # 20 blocks = 80 tokens for up to 16 requests of up to 80 tokens
    loop = make_loop(arena, memory=memory, predictor="max_tokens", cap_bytes=cap,
                     preemption="swap")
    reqs = workload(16, seed=7, max_prompt=30, max_out=40, gap=0.0)
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    assert m.counters.preemptions > 0
    assert m.peak("mapped_bytes") <= cap
    assert all(r.generated == r.target for r in reqs)


@pytest.mark.parametrize("memory", ["on-demand", "windowed"])
def test_a_device_limit_below_the_cap_is_respected(memory):
    arena = make_arena(chunks=64, device_chunks=4)
    loop = make_loop(arena, memory=memory, cap_bytes=32 * PAGE, preemption="recompute",
                     predictor="max_tokens")
    assert loop.limit_blocks() == 16
    reqs = workload(12, seed=3, max_prompt=20, max_out=44, gap=0.0)
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    assert m.peak("mapped_bytes") <= 4 * PAGE
    assert m.counters.preemptions_swap == 0
    if memory == "on-demand":
        assert m.counters.preemptions_recompute > 0


def test_mispredictions_are_counted_and_served_by_emergency_grows():
    arena = make_arena()
    loop = make_loop(arena, memory="windowed", predictor=OneTokenLeft(),
                     planner=PlannerConfig(min_decode_steps=8, max_decode_steps=8,
                                           margin_blocks=0, margin_fraction=0.0))
    reqs = [Request(i, 3, 30, 30) for i in range(4)]
    loop.submit_many(reqs)
    m = run_checked(loop, reqs)
    # Every lease raise past the plan's budgets is an emergency grow; prompt chunks and
    # planned growth raise leases too, inside the budgets, and are not.
    assert 0 < m.counters.emergency_grows <= m.counters.lease_misses
    assert m.counters.preemptions == 0
    # A predictor that knows the truth never misses.
    arena2 = make_arena()
    loop2 = make_loop(arena2, memory="windowed", predictor="oracle",
                      planner=PlannerConfig(min_decode_steps=1, max_decode_steps=8,
                                            margin_blocks=0, margin_fraction=0.0))
    reqs2 = [Request(i, 3, 30, 30) for i in range(4)]
    loop2.submit_many(reqs2)
    assert run_checked(loop2, reqs2).counters.emergency_grows == 0


def test_batches_respect_the_budget_and_chunk_prompts():
    batches = []

    def step(b):
        batches.append(b)
        return 2e-3

    arena = make_arena()
    loop = make_loop(arena, step=step, memory="on-demand", token_budget=8)
    reqs = [Request(0, 19, 3, 3), Request(1, 5, 2, 2)]
    loop.submit_many(reqs)
    run_checked(loop, reqs)
    b0 = batches[0]
    # The first step: an 8-token chunk of request 0's prompt (request 1 waits its turn).
    assert b0.req_ids.tolist() == [0] and b0.num_tokens.tolist() == [8]
    assert b0.is_prefill.tolist() == [True] and b0.context_lens.tolist() == [8]
    assert b0.positions.tolist() == list(range(8))
    for b in batches:
        assert int(b.num_tokens.sum()) <= 8
        assert b.query_start_loc.tolist() == [0] + np.cumsum(b.num_tokens).tolist()
        assert b.slot_mapping.dtype == np.int64 and b.slot_mapping.size == b.num_tokens.sum()
        assert np.all(b.num_tokens[~b.is_prefill] == 1)
        assert len(set(b.slot_mapping.tolist())) == b.slot_mapping.size
    prompt_tokens = sum(int(b.num_tokens[b.is_prefill].sum()) for b in batches)
    assert prompt_tokens == 24
    assert sum(int((~b.is_prefill).sum()) for b in batches) == (3 - 1) + (2 - 1)


def test_slot_mapping_points_into_the_block_table():
    seen = []

    def step(b):
        tab = loop.arena.tables.host
        for i, rid in enumerate(b.req_ids.tolist()):
            a, z = b.query_start_loc[i], b.query_start_loc[i + 1]
            pos = b.positions[a:z]
            blocks = tab[b.block_table_rows[i], pos // 4]
            assert np.array_equal(b.slot_mapping[a:z], blocks.astype(np.int64) * 4 + pos % 4)
            seen.append(rid)
        return 1e-3

    loop = make_loop(make_arena(), step=step, memory="windowed")
    reqs = workload(6, seed=5)
    loop.submit_many(reqs)
    run_checked(loop, reqs)
    assert set(seen) == set(range(6))


def test_the_clock_jumps_to_arrivals_and_charges_arena_costs():
    cost = ModeledGPUCost(map_s_per_chunk=1e-3, unmap_s_per_chunk=2e-3, op_overhead_s=0.0)
    arena = make_arena()
    loop = EngineLoop(arena, lambda b: 0.01, LatencyModel(LAT),
                      LoopConfig(memory="on-demand", token_budget=64), cost_model=cost)
    r = Request(0, 10, 4, 4, arrival_s=5.0)
    loop.submit(r)
    m = loop.run()
    c = m.counters
    assert c.steps == 4 and c.model_time_s == pytest.approx(0.04)
    assert c.arena_time_s == pytest.approx(c.map_calls * 1e-3 + c.unmap_calls * 2e-3)
    assert m.end_s == pytest.approx(5.0 + 0.04 + c.arena_time_s)
    assert r.first_token_s >= 5.01
    assert r.finish_s <= m.end_s + 1e-12
    rec = m.requests[0]
    assert rec.ttft_s == pytest.approx(r.first_token_s - 5.0)
    assert rec.tpot_s == pytest.approx(0.01, abs=3e-3)


def test_latency_model_learns_from_reported_durations():
    lat = LatencyModel((1.0, 0, 0, 0, 0), prior_weight=1e-6)
    loop = EngineLoop(make_arena(), lambda b: 4e-3 + 1e-4 * b.num_seqs, lat,
                      LoopConfig(memory="static", static_bytes=8 * PAGE))
    loop.submit_many(workload(10, seed=2))
    loop.run()
    assert lat.num_observations == loop.metrics.counters.steps
    assert lat.decode_time(10, 0) == pytest.approx(5e-3, rel=0.05)


def test_metrics_time_average_and_peak():
    from scheduler.metrics import Metrics

    m = Metrics(start_s=0.0, end_s=4.0)
    for t, mapped, live in ((0.0, 100, 10), (1.0, 300, 30), (3.0, 200, 20)):
        m.timeline.append(t, mapped, 0, 0, 0, live, 0, 0, 0, 0, 0)
    assert m.time_average("mapped_bytes") == pytest.approx((100 + 2 * 300 + 200) / 4)
    assert m.peak("mapped_bytes") == 300 and m.mapped_to_live() == pytest.approx(10.0)
    s = m.summary()
    assert s["mapped_bytes_peak"] == 300 and "preemptions" in s["counters"]


def test_bad_input_raises():
    arena = make_arena(chunks=8)
    with pytest.raises(ValueError, match="memory"):
        LoopConfig(memory="lazy")
    with pytest.raises(ValueError, match="token_budget"):
        LoopConfig(token_budget=0)
    with pytest.raises(TypeError, match="arena"):
        EngineLoop("arena", lambda b: 0.0, LatencyModel(LAT))
    loop = make_loop(arena, memory="on-demand", cap_bytes=2 * PAGE)
    loop.submit(Request(0, 4, 4, 4))
    with pytest.raises(ValueError, match="already"):
        loop.submit(Request(0, 4, 4, 4))
    with pytest.raises(ValueError, match="cannot fit"):
        loop.submit(Request(1, 30, 10, 10))        # 39 tokens > 8 blocks of 4
    loop2 = make_loop(make_arena(chunks=8), memory="on-demand", cap_bytes=2 * PAGE,
                      oversize="reject")
    loop2.submit(Request(1, 30, 10, 10))
    assert loop2.metrics.counters.rejected == 1 and loop2.idle
    # static never maps more than static_bytes: that is its limit, not the cap.
    st_loop = make_loop(make_arena(chunks=8), memory="static", cap_bytes=8 * PAGE,
                        static_bytes=2 * PAGE)
    assert st_loop.limit_blocks() == 8 and st_loop.arena.mapped_bytes == 2 * PAGE
    with pytest.raises(ValueError, match="cannot fit"):
        st_loop.submit(Request(0, 30, 10, 10))    # 39 tokens = 10 blocks > 8
    bad = make_loop(make_arena(chunks=8), step=lambda b: -1.0, memory="on-demand")
    bad.submit(Request(0, 4, 4, 4))
    with pytest.raises(ValueError, match="step_fn"):
        bad.step()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(memory=st.sampled_from(["static", "on-demand", "windowed"]),
       predictor=st.sampled_from(["max_tokens", "empirical", "oracle", "under"]),
       preemption=st.sampled_from(["swap", "recompute", "auto"]),
       cap_chunks=st.integers(3, 10), budget=st.sampled_from([8, 16, 64]),
       reqs=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 30), st.integers(1, 30),
                               st.floats(0, 0.05)), min_size=4, max_size=24))
def test_random_workloads_keep_the_invariants(memory, predictor, preemption, cap_chunks,
                                              budget, reqs):
    arena = make_arena(chunks=16, max_seqs=16)
    # "under" mispredicts every window: emergency grows, and preemptions when they fail.
    pred = OneTokenLeft() if predictor == "under" else predictor
    loop = make_loop(arena, memory=memory, predictor=pred, preemption=preemption,
                     cap_bytes=cap_chunks * PAGE, token_budget=budget, oversize="reject")
    rs = [Request(i, p, m, o, arrival_s=t) for i, (p, m, o, t) in enumerate(reqs)]
    loop.submit_many(rs)
    # Rejected: prompt + max_tokens cannot fit under the cap (4 tokens a block).
    too_big = [r for r in rs if -(-(r.prompt_tokens + r.max_tokens - 1) // 4) > 4 * cap_chunks]
    assert loop.metrics.counters.rejected == len(too_big)
    assert all(r.extra.get("rejected") for r in too_big)
    ok = [r for r in rs if not r.extra.get("rejected")]
    m = run_checked(loop, ok)
    assert all(r.phase == Phase.FINISHED and r.generated == r.target for r in ok)
    assert all(r.generated == 0 for r in too_big)
    assert sorted(r.req_id for r in m.requests) == sorted(r.req_id for r in ok)
    # Every output token came from a decode step or a completed (re-)prefill.
    assert m.counters.decode_tokens + m.counters.prefills_completed == sum(r.target for r in ok)
    if m.counters.preemptions_recompute == 0:
        assert m.counters.decode_tokens == sum(r.target - 1 for r in ok)
    # Every prompt is prefilled once, plus every recompute's prompt + generated tokens.
    assert m.counters.prefill_tokens >= sum(r.prompt_tokens for r in ok)
    if m.counters.preemptions_recompute == 0:
        assert m.counters.prefill_tokens == sum(r.prompt_tokens for r in ok)
    assert m.peak("mapped_bytes") <= cap_chunks * PAGE
    assert arena.used_blocks == 0
    assert all(math.isfinite(x.first_token_s) for x in ok)


def test_latency_step_reports_the_models_prediction():
    seen = []
    truth = LatencyModel((2e-3, 1e-5, 1e-8, 1e-4, 1e-7))
    step = latency_step(truth)

    def model(b):
        d = step(b)
        pre = b.is_prefill
        t = b.num_tokens[pre].astype(float)
        ctx = b.context_lens.astype(float)
        want = (2e-3 + 1e-5 * t.sum() + 1e-8 * float(np.dot(t, ctx[pre] - t) + np.dot(t, t + 1) / 2)
                + 1e-4 * (~pre).sum() + 1e-7 * ctx[~pre].sum())
        assert d == pytest.approx(want)
        seen.append(d)
        return d

    loop = make_loop(make_arena(), step=model, memory="on-demand", token_budget=16)
    loop.submit_many(workload(5, seed=9))
    m = loop.run()
    assert m.counters.model_time_s == pytest.approx(sum(seen))
    with pytest.raises(TypeError, match="model"):
        latency_step("fast")


def test_modeled_gpu_cost():
    cost = ModeledGPUCost(map_s_per_chunk=1e-4, unmap_s_per_chunk=2e-4, device_bandwidth=1e9,
                          host_bandwidth=1e8, op_overhead_s=1e-6)
    assert cost(ArenaOp("resize", 5.0)) == 0.0          # did nothing: free
    op = ArenaOp("shrink", 5.0, chunks_mapped=2, chunks_unmapped=3, bytes_moved=10 ** 6,
                 bytes_copied=10 ** 6)
    assert cost(op) == pytest.approx(2e-4 + 6e-4 + 2e-3 + 1e-2 + 1e-6)


def test_arrival_reserve_saves_map_calls_under_a_steady_stream():
    """Steady arrivals: keeping ~the next admissions' blocks mapped at each shrink means
    fewer chunks unmapped and mapped again, and every request still finishes."""
    counts = {}
    for reserve_s in (0.0, 0.02):
        arena = make_arena(64, max_seqs=32)
        loop = make_loop(arena, memory="windowed", predictor="oracle", cap_bytes=32 * PAGE,
                         planner=PlannerConfig(min_decode_steps=2, max_decode_steps=16,
                                               arrival_reserve_s=reserve_s))
        reqs = [Request(i, 12 + (i * 7) % 20, 30, 4 + (i * 5) % 12, arrival_s=0.004 * i)
                for i in range(60)]
        loop.submit_many(reqs)
        m = run_checked(loop, reqs)
        counts[reserve_s] = (m.counters.map_calls, m.counters.unmap_calls)
        arena.close()
    assert counts[0.02][0] < counts[0.0][0] and counts[0.02][1] < counts[0.0][1], counts


def test_admission_takes_only_the_queue_head_it_can_admit(monkeypatch):
    """First-come-first-served admission (static, on-demand) walks the head of the queue,
    not a copy of all of it per step: with 300 queued requests, no step copies the queue."""
    loop = make_loop(make_arena(chunks=64), memory="on-demand")
    loop.submit_many(workload(300, seed=0, gap=0.0))

    def copying():
        raise AssertionError("the whole waiting queue was copied")

    monkeypatch.setattr(loop, "waiting_requests", copying)
    loop.run(max_steps=50)
    assert loop.metrics.counters.steps == 50 and loop.num_waiting > 200
