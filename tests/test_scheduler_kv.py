"""KV bytes through preemption and compaction: swapped requests come back byte for byte,
recomputed ones are re-prefilled to the same bytes, compaction moves nothing wrong.

The synthetic model writes every token's K/V with ``kernels.write_kv`` (interpreted on
CPU, so the shapes stay tiny)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arena import KVSpec, PagedArena
from scheduler import EngineLoop, LatencyModel, LoopConfig, PlannerConfig, Request
from scheduler.request import Phase
from scheduler.synthetic import SyntheticKVModel
from tests.scheduler_helpers import LAT, PAGE, SPEC, make_arena, make_loop, planner_config


def setup(memory, cap_chunks, preemption, **cfg):
    arena = make_arena(32, max_seqs=16)
    model = SyntheticKVModel(arena, 1e-3)
    cfg.setdefault("planner", planner_config(2, 8))
    loop = make_loop(arena, model, memory=memory, cap_bytes=cap_chunks * PAGE,
                     preemption=preemption, **cfg)
    return arena, model, loop


def run_and_check_kv(loop, model, reqs, max_steps=2000):
    """Step to the end; after every step, every running request's cache must hold exactly
    the K/V of its tokens. Returns the ids checked after coming back from a preemption."""
    resumed = set()
    for _ in range(max_steps):
        if loop.idle:
            break
        loop.step()
        for r in loop.decode_requests + loop.prefill_requests:
            assert model.mismatches(r.req_id, r.kv_len) == 0, f"request {r.req_id}"
            if r.num_preemptions:
                resumed.add(r.req_id)
    assert loop.idle
    assert all(r.phase == Phase.FINISHED and r.generated == r.target for r in reqs)
    return resumed


def test_swapped_requests_come_back_byte_identical():
    arena, model, loop = setup("static", 3, "swap", static_bytes=3 * PAGE)
    # 12 blocks = 48 tokens for 5 requests growing to 17..23 tokens: decode must preempt.
    reqs = [Request(i, 6 + i, 14, 14 + (i % 3)) for i in range(5)]
    loop.submit_many(reqs)
    resumed = run_and_check_kv(loop, model, reqs)
    c = loop.metrics.counters
    assert c.preemptions_swap > 0 and c.preemptions_recompute == 0
    assert resumed and c.swap_in_bytes == c.swap_out_bytes > 0
    # Swapped requests are never re-prefilled.
    assert c.prefill_tokens == sum(r.prompt_tokens for r in reqs)


def test_recomputed_requests_are_reprefilled_to_the_same_bytes():
    arena, model, loop = setup("on-demand", 3, "recompute")
    reqs = [Request(i, 6 + i, 14, 14 + (i % 3)) for i in range(5)]
    loop.submit_many(reqs)
    preempted_at = {}
    orig = loop.preempt

    def spy(r, swap):
        if r.phase == Phase.DECODE:
            preempted_at.setdefault(r.req_id, []).append(r.prompt_tokens + r.generated)
        else:
            preempted_at.setdefault(r.req_id, []).append(0)
        orig(r, swap)

    loop.preempt = spy
    resumed = run_and_check_kv(loop, model, reqs)
    c = loop.metrics.counters
    assert c.preemptions_recompute > 0 and c.preemptions_swap == 0 and resumed
    # Each decode-time recompute re-prefills the prompt and every token generated so far
    # (a prompt cut short is redone from its start: counted through prefill_tokens too).
    redo = sum(sum(v) for v in preempted_at.values())
    assert c.prefill_tokens >= sum(r.prompt_tokens for r in reqs) + redo
    assert c.recomputed_tokens > 0


def test_windowed_preemption_keeps_kv_intact():
    arena, model, loop = setup("windowed", 4, "swap", predictor="max_tokens")
    # max_tokens (40) overstates every window's growth: the planner preempts to fit it.
    reqs = [Request(i, 5 + i % 3, 40, 12 + 2 * (i % 4)) for i in range(4)]
    loop.submit_many(reqs)
    run_and_check_kv(loop, model, reqs)
    c = loop.metrics.counters
    assert c.shrinks > 0 and c.unmap_calls > 0 and c.preemptions_swap > 0
    assert loop.metrics.peak("mapped_bytes") <= 4 * PAGE


def test_compaction_at_a_window_end_moves_live_blocks_intact():
    arena, model, loop = setup("windowed", 8, "swap", predictor="oracle")
    # Four 15-token prompts fill blocks 0..15 in admission order; the first three finish
    # after 2 tokens, the last (in the top chunk) runs on: the window end that follows
    # compacts it down and unmaps the top.
    reqs = [Request(i, 15, 30, 2 if i < 3 else 24) for i in range(4)]
    loop.submit_many(reqs)
    run_and_check_kv(loop, model, reqs)
    c = loop.metrics.counters
    assert c.shrinks > 0 and c.compaction_moves > 0
    assert c.compaction_bytes == c.compaction_moves * SPEC.block_bytes


def test_expected_values_are_exact_and_distinct():
    arena = PagedArena(SPEC, 4 * PAGE, "cpu", granularity=PAGE)
    model = SyntheticKVModel(arena)
    k0, v0 = model.expected(3, 5, 0)
    k1, _ = model.expected(3, 5, 1)
    k2, _ = model.expected(4, 5, 0)
    assert k0.dtype == torch.float16 and k0.shape == (5, 2, 16)
    assert not torch.equal(k0, v0) and not torch.equal(k0, k1) and not torch.equal(k0, k2)
    # Multiples of 1/32 in [-8, 8): exactly representable.
    assert torch.equal(k0.float() * 32, (k0.float() * 32).round())
    with pytest.raises(ValueError, match="duration_s"):
        SyntheticKVModel(arena, -1.0)


def test_the_check_sees_a_single_wrong_byte():
    arena, model, loop = setup("on-demand", 8, "swap")
    loop.submit(Request(0, 9, 4, 4))
    loop.step()                                   # the prompt's 9 tokens are written
    r = loop.prefill_requests[0] if loop.prefill_requests else loop.decode_requests[0]
    assert model.mismatches(0, r.kv_len) == 0
    block = int(arena.tables.blocks(0)[1])
    arena.kv_cache(1)[block, 1, 2, 1, 5] += 1     # layer 1, V, token 6, head 1, dim 5
    assert model.mismatches(0, r.kv_len) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("memory,preemption", [("windowed", "swap"), ("static", "recompute"),
                                               ("on-demand", "swap")])
def test_a_cuda_arena_keeps_kv_intact_through_preemption(memory, preemption):
    # 8 KiB a token, 128 KiB blocks of 16 tokens: a 2 MiB chunk holds 16 blocks.
    spec = KVSpec(2, 8, 128, block_size=16, dtype=torch.float16)
    chunk = 2 << 20
    arena = PagedArena(spec, 16 * chunk, "cuda", max_seqs=16)
    model = SyntheticKVModel(arena, 1e-3)
    loop = EngineLoop(arena, model, LatencyModel(LAT),
                      LoopConfig(memory=memory, cap_bytes=2 * chunk, static_bytes=2 * chunk,
                                 token_budget=256, preemption=preemption,
                                 predictor="max_tokens",
                                 planner=PlannerConfig(min_decode_steps=4, max_decode_steps=32)))
    # 32 blocks = 512 tokens for 8 requests growing to 140..225 tokens (the same set-up on
    # the host backend preempts 4 (windowed) and 6 (static, on-demand) times).
    reqs = [Request(i, 40 + 10 * (i % 6), 160, 100 + 5 * i) for i in range(8)]
    loop.submit_many(reqs)
    resumed = run_and_check_kv(loop, model, reqs, max_steps=5000)
    c = loop.metrics.counters
    assert c.preemptions > 0 and resumed
    assert loop.metrics.peak("mapped_bytes") <= 2 * chunk
    arena.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(memory=st.sampled_from(["static", "on-demand", "windowed"]),
       preemption=st.sampled_from(["swap", "recompute"]),
       reqs=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.floats(0, 0.01)),
                     min_size=2, max_size=6))
def test_random_workloads_keep_kv_byte_identical(memory, preemption, reqs):
    arena, model, loop = setup(memory, 2, preemption, static_bytes=2 * PAGE,
                               predictor="max_tokens")
    rs = [Request(i, p, 12, o, arrival_s=t) for i, (p, o, t) in enumerate(reqs)]
    loop.submit_many(rs)
    run_and_check_kv(loop, model, rs)
    assert loop.metrics.peak("mapped_bytes") <= 2 * PAGE
