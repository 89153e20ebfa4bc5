"""Window planner: exact windows, demands and targets for hand-built sets; preemption,
admission and shrink; properties over random sets."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.latency import LatencyModel
from scheduler.planner import (ArenaState, PlannerConfig, WindowPlanner, decode_growth,
                               decode_set, handoff_growth, prefill_sums)
from scheduler.predictor import MaxTokensPredictor, OraclePredictor
from scheduler.request import Request, RequestSet

C = (1e-2, 1e-4, 1e-6, 1e-3, 1e-5)


def _planner(**kw):
    cfg = dict(block_size=4, block_bytes=1024, token_budget=16, max_prefill_tokens=32,
               min_decode_steps=2, max_decode_steps=8, margin_fraction=0.0, margin_blocks=1,
               preemption="swap")
    cfg.update(kw)
    return WindowPlanner(LatencyModel(C), MaxTokensPredictor(), PlannerConfig(**cfg))


def _sets():
    # Decode: A has 2 tokens left, B 19, C 26 (max_tokens predictor).
    dec = RequestSet.from_arrays(ids=[10, 11, 12], kv_len=[10, 7, 16], generated=[3, 1, 4],
                                 max_tokens=[5, 20, 30], block_size=4, admit_seq=[0, 1, 2])
    # Prefill: one prompt of 24 tokens with its first 4 written.
    pre = RequestSet.from_arrays(ids=[20], kv_len=[4], prefill_len=[24], max_tokens=[10],
                                 blocks=[1], admit_seq=[3])
    return pre, dec


def test_exact_windows_demands_and_targets():
    pre, dec = _sets()
    p = _planner().plan(pre, dec, None, ArenaState(100, 64, 16))
    step = C[0] + 3 * C[3] + 36 * C[4]              # 3 sequences reading 33 + 3 tokens
    assert p.step_time_s == pytest.approx(step)
    # 20 prompt tokens left at 16 per step: 2 steps, each carrying the decode set.
    assert p.prefill_steps == 2
    assert p.prefill_window_s == pytest.approx(2 * step + 20 * C[1] + (20 * 4 + 210) * C[2])
    # k = min(first finish = 2, hand-off = 2), within [2, 8].
    assert p.decode_steps == 2
    assert p.decode_window_s == pytest.approx(2 * (step + C[4] * 3 * 0.5))
    # Growth: A ceil(12/4)-3 = 0, B ceil(9/4)-2 = 1, C ceil(18/4)-4 = 1.
    assert (p.decode.static, p.decode.growth, p.decode.margin) == (9, 2, 1)
    assert (p.prefill.static, p.prefill.growth, p.prefill.margin) == (1, 5, 1)
    assert (p.prefill_target, p.decode_target) == (7, 12)
    assert p.fits and p.admit == 0 and p.preempt_ids.size == 0
    assert p.remaining.tolist() == [2, 19, 26]
    # Shrink at a window end when the mapped top exceeds ceil-to-chunk(19) = 32 by a chunk.
    assert p.shrink
    assert not _planner().plan(pre, dec, None, ArenaState(100, 40, 16)).shrink
    assert not _planner().plan(pre, dec, None, ArenaState(100, 64, 16), window_end=False).shrink


def test_arrival_reserve_keeps_blocks_mapped_through_a_shrink():
    pre, dec = _sets()                      # targets 7 + 12 = 19 blocks, chunks of 16
    plan = _planner(arrival_reserve_s=0.5).plan
    # 30 blocks/s for 0.5 s: a reserve of 15, top ceil-to-chunk(34) = 48.
    p = plan(pre, dec, None, ArenaState(100, 64, 16), admission_rate_blocks_s=30.0)
    assert p.reserve_blocks == 15 and p.shrink
    p = plan(pre, dec, None, ArenaState(100, 48, 16), admission_rate_blocks_s=30.0)
    assert p.reserve_blocks == 15 and not p.shrink  # 48 mapped: nothing above the reserve
    # The reserve never asks for more than the supply leaves after the targets.
    assert plan(pre, dec, None, ArenaState(25, 64, 16),
                admission_rate_blocks_s=30.0).reserve_blocks == 6
    # No rate, or a zero reserve time: no reserve.
    assert plan(pre, dec, None, ArenaState(100, 64, 16)).reserve_blocks == 0
    assert _planner(arrival_reserve_s=0.0).plan(
        pre, dec, None, ArenaState(100, 64, 16), admission_rate_blocks_s=30.0).reserve_blocks == 0


def test_margin_fraction_and_window_bounds():
    pre, dec = _sets()
    p = _planner(margin_fraction=0.5, margin_blocks=0, min_decode_steps=6).plan(
        pre, dec, None, ArenaState(100))
    assert p.decode_steps == 6                       # raised to the lower bound
    # Growth for 6 steps: A min(6,2): 0; B ceil(13/4)-2 = 2; C ceil(22/4)-4 = 2.
    # The prefill batch hands off after 2 steps and decodes 4 more: ceil(28/4)-6 = 1.
    assert (p.decode.static, p.decode.growth) == (9, 5)
    assert p.decode.margin == math.ceil(0.5 * 14) and p.prefill.margin == 3
    p = _planner(max_decode_steps=2, min_decode_steps=1).plan(RequestSet.empty(), dec, None,
                                                               ArenaState(100))
    assert p.decode_steps == 2 and p.prefill_steps == 0 and p.prefill_target == 0


def test_next_arrival_bounds_the_decode_window():
    pre, dec = _sets()
    p = _planner(max_decode_steps=64).plan(RequestSet.empty(), dec.__class__(
        *(getattr(dec, f)[1:] for f in ("ids", "kv_len", "prefill_len", "generated",
                                        "max_tokens", "blocks", "admit_seq", "swapped"))),
        None, ArenaState(100), now_s=1.0, next_arrival_s=1.0 + 5.5 * 0.0123)
    step = C[0] + 2 * C[3] + 25 * C[4]
    assert p.decode_steps == math.ceil(5.5 * 0.0123 / step)


def test_preemption_when_the_device_cannot_supply():
    pre, dec = _sets()
    pl = _planner()
    # 19 wanted, 15 there: margins go (17), then the most recent decode request (C).
    p = pl.plan(pre, dec, None, ArenaState(15))
    assert p.preempt_ids.tolist() == [12] and p.preempt_swap.tolist() == [True]
    assert (p.decode.static, p.decode.growth, p.decode.margin) == (5, 1, 0)
    assert p.prefill_target + p.decode_target <= 15 and p.fits
    # 8 there: every decode request goes; prefill still gets all it needs.
    p = pl.plan(pre, dec, None, ArenaState(8))
    assert p.preempt_ids.tolist() == [12, 11, 10] and p.fits
    assert p.decode_target == 0 and p.prefill_target == 6
    # 4 there: not even the prefill batch fits; its growth is cut and the shortfall named.
    p = pl.plan(pre, dec, None, ArenaState(4))
    assert not p.fits and p.shortfall_blocks == 2 and p.prefill_target == 4


def test_victim_policy_and_recompute_mode_are_pluggable():
    pre, dec = _sets()
    pl = _planner(victim="most-blocks", preemption="recompute")
    p = pl.plan(pre, dec, None, ArenaState(15))
    assert p.preempt_ids.tolist() == [12] and p.preempt_swap.tolist() == [False]
    pl = _planner(victim=lambda s, rem: np.argsort(s.blocks, kind="stable"))
    p = pl.plan(pre, dec, None, ArenaState(15))
    # Fewest blocks first: B (2 + 1), then A (3 + 0) frees 6 >= 2.
    assert p.preempt_ids.tolist() == [11]


def test_auto_mode_swaps_long_contexts_and_recomputes_short_ones():
    from scheduler.policies import PreemptionMode

    mode = PreemptionMode("auto", host_bandwidth=1e9)
    lat = LatencyModel(C)
    swap = mode(np.array([4, 4000]), np.array([1, 1000]), 1024, lat)
    # 4 tokens: recompute costs 4e-4 + 1e-5 s, swap 2 KiB / 1 GB/s = 2e-6 s -> swap;
    # 4,000 tokens: recompute ~8.4 s, swap ~2 ms -> swap. Make swap expensive to flip one.
    assert swap.tolist() == [True, True]
    swap = PreemptionMode("auto", host_bandwidth=1e3)(np.array([4, 4000]),
                                                      np.array([1, 1000]), 1024, lat)
    assert swap.tolist() == [False, False]


def test_admission_takes_a_fitting_prefix_of_the_queue():
    pl = _planner()
    wait = RequestSet.from_arrays(ids=[1, 2, 3], kv_len=[0, 0, 0], prefill_len=[10, 20, 30],
                                  max_tokens=[50, 50, 50], blocks=[0, 0, 0],
                                  admit_seq=[-1, -1, -1])
    e = RequestSet.empty()
    # Token budget of the batch in flight (32): the first two (30 tokens).
    p = pl.plan(e, e, wait, ArenaState(100))
    assert p.admit == 2 and p.fits
    assert (p.prefill.static, p.prefill.growth, p.prefill.margin) == (0, 8, 1)
    assert p.prefill_steps == 2 and p.decode_target == 0
    # Memory: the first two cost 3+1+1 and 5 blocks (prompt; the first hands off at step 1
    # of the union's 2-step window and decodes one token, the second at step 2 and decodes
    # none; margins).
    p = pl.plan(e, e, wait, ArenaState(10))
    assert p.admit == 2 and p.prefill_target == 9
    p = pl.plan(e, e, wait, ArenaState(9))
    assert p.admit == 1 and p.prefill_target == 4
    assert p.prefill_target + p.decode_target <= 9
    # No admission when the condition already fails.
    pre, dec = _sets()
    assert pl.plan(pre, dec, wait, ArenaState(15)).admit == 0


def test_swapped_requests_resume_into_decode():
    pl = _planner()
    wait = RequestSet.from_arrays(ids=[7], kv_len=[9], prefill_len=[9], generated=[3],
                                  max_tokens=[6], blocks=[0], admit_seq=[0], swapped=[True])
    e = RequestSet.empty()
    p = pl.plan(e, e, wait, ArenaState(100))
    # 3 blocks of KV come back; 3 more tokens (its max) fit in ceil(12/4) = 3 blocks.
    assert p.admit == 1 and p.prefill_target == 0
    assert (p.decode.static, p.decode.growth, p.decode.margin) == (3, 0, 1)


def test_a_request_alone_is_admitted_even_if_margins_do_not_fit():
    pl = _planner(margin_fraction=0.5)
    wait = RequestSet.from_arrays(ids=[1], kv_len=[0], prefill_len=[31], max_tokens=[1],
                                  blocks=[0], admit_seq=[-1])
    e = RequestSet.empty()
    p = pl.plan(e, e, wait, ArenaState(8))
    assert p.admit == 1 and p.prefill_target + p.decode_target <= 8


def test_oracle_predictions_drive_the_window():
    pre, dec = _sets()
    oracle = OraclePredictor({10: 4, 11: 6, 12: 40})
    pl = WindowPlanner(LatencyModel(C), oracle, PlannerConfig(block_size=4, min_decode_steps=1,
                                                              max_decode_steps=64))
    p = pl.plan(RequestSet.empty(), dec, None, ArenaState(1000))
    # C would run to 40 but max_tokens (30) caps it: 26 left.
    assert p.remaining.tolist() == [1, 5, 26] and p.decode_steps == 1


def test_bad_config_raises():
    with pytest.raises(ValueError, match="max_decode_steps"):
        PlannerConfig(min_decode_steps=8, max_decode_steps=4)
    with pytest.raises(ValueError, match="block_size"):
        PlannerConfig(block_size=0)
    with pytest.raises(ValueError, match="victim"):
        PlannerConfig(victim="random")
    with pytest.raises(ValueError, match="arrival_reserve_s"):
        PlannerConfig(arrival_reserve_s=-1.0)
    with pytest.raises(TypeError, match="latency"):
        WindowPlanner("fast")
    with pytest.raises(ValueError, match="kv_len"):
        RequestSet.from_arrays(ids=[1, 2], kv_len=[1], block_size=4)
    with pytest.raises(ValueError, match="prompt_tokens"):
        Request(1, 0, 10, 10)


def test_request_set_snapshot_of_requests():
    rs = [Request(5, 12, 8, 3), Request(6, 4, 2, 9)]
    rs[0].kv_len, rs[0].num_blocks, rs[0].admit_seq = 12, 3, 0
    s = RequestSet.from_requests(rs)
    assert s.ids.tolist() == [5, 6] and s.kv_len.tolist() == [12, 0]
    assert s.prefill_len.tolist() == [12, 4] and s.blocks.tolist() == [3, 0]
    assert s.admit_seq.tolist() == [0, -1] and not s.swapped.any()
    assert rs[1].target == 2 and rs[0].final_kv_len == 12 + 3 - 1


def _brute_decode_growth(kv, blocks, rem, k, bs):
    return sum(max(-(-(kv_i + min(r, k)) // bs) - b, 0) for kv_i, b, r in zip(kv, blocks, rem))


@settings(max_examples=80, deadline=None)
@given(data=st.data(), nd=st.integers(0, 40), npre=st.integers(0, 14), nw=st.integers(0, 12),
       supply=st.integers(0, 600), margin=st.sampled_from([0.0, 0.1]),
       victim=st.sampled_from(["most-recent", "most-blocks", "longest-remaining"]))
def test_plan_properties(data, nd, npre, nw, supply, margin, victim):
    bs = 4
    kv = np.array(data.draw(st.lists(st.integers(1, 120), min_size=nd, max_size=nd)), np.int64)
    gen = np.minimum(np.array(data.draw(st.lists(st.integers(1, 50), min_size=nd,
                                                 max_size=nd)), np.int64), kv)
    maxt = gen + np.array(data.draw(st.lists(st.integers(1, 80), min_size=nd, max_size=nd)),
                          np.int64)
    dec = RequestSet.from_arrays(ids=np.arange(nd), kv_len=kv, generated=gen, max_tokens=maxt,
                                 block_size=bs, admit_seq=np.arange(nd))
    plen = np.array(data.draw(st.lists(st.integers(1, 60), min_size=npre, max_size=npre)),
                    np.int64)
    done = np.array([data.draw(st.integers(0, int(x) - 1)) for x in plen], np.int64)
    pre = RequestSet.from_arrays(ids=100 + np.arange(npre), kv_len=done, prefill_len=plen,
                                 max_tokens=np.full(npre, 30), block_size=bs,
                                 admit_seq=nd + np.arange(npre))
    wl = np.array(data.draw(st.lists(st.integers(1, 60), min_size=nw, max_size=nw)), np.int64)
    # Some waiting entries were swapped out mid-decode: they resume with their KV.
    wsw = np.array(data.draw(st.lists(st.booleans(), min_size=nw, max_size=nw)), dtype=bool)
    wgen = np.where(wsw, np.minimum(wl, 19), 0)
    wait = RequestSet.from_arrays(ids=200 + np.arange(nw), kv_len=np.where(wsw, wl, 0),
                                  prefill_len=wl, generated=wgen, max_tokens=np.full(nw, 20),
                                  blocks=np.zeros(nw, np.int64),
                                  admit_seq=np.where(wsw, 1000 + np.arange(nw), -1),
                                  swapped=wsw)
    pl = _planner(margin_fraction=margin, victim=victim, max_running=64)
    supply = max(supply, int(pre.blocks.sum()))  # the prefill set's blocks are leased
    p = pl.plan(pre, dec, wait, ArenaState(supply, 0, 16))

    assert 2 <= p.decode_steps <= 8
    assert p.prefill_window_s >= 0 and p.decode_window_s >= 0
    victims = set(p.preempt_ids.tolist())
    assert len(victims) == p.preempt_ids.size and victims <= set(range(nd))
    keep = np.array([i not in victims for i in range(nd)], dtype=bool)
    # Targets cover what the remaining sets hold.
    # Admitted swapped entries hold their KV's blocks again.
    back = int((-(-wl[:p.admit] // bs))[wsw[:p.admit]].sum())
    assert p.decode.static == int(dec.blocks[keep].sum()) + back
    assert p.prefill.static == int(pre.blocks.sum())
    assert p.prefill_target >= p.prefill.static and p.decode_target >= p.decode.static
    if p.fits:
        assert p.prefill_target + p.decode_target <= supply
    else:
        assert p.decode.static == 0 and p.decode.growth == 0
    rem = maxt - gen
    if victims:
        assert p.admit == 0 and p.prefill.margin == 0 and p.decode.margin == 0
        if p.fits:
            # Minimal: with the last victim kept, the demand would not have fitted.
            last = int(p.preempt_ids[-1])
            extra = int(dec.blocks[last]) + _brute_decode_growth(
                kv[[last]], dec.blocks[[last]], rem[[last]], p.decode_steps, bs)
            assert (p.prefill.static + p.prefill.growth + p.decode.static + p.decode.growth
                    + extra > supply)
    assert p.admit <= nw
    big = pl.plan(pre, dec, wait, ArenaState(10 ** 6))
    assert big.fits and big.preempt_ids.size == 0
    alone = pl.plan(pre, dec, None, ArenaState(10 ** 6))
    # With room for all: the decode growth is the per-request sum, plus the hand-off growth
    # of prefill requests that decode inside the window; a short supply only cuts it.
    want = _brute_decode_growth(kv, dec.blocks, rem, alone.decode_steps, bs)
    # Each prompt hands off when the prompts ahead of it and its own are chunked at the
    # token budget (16) less one row per decode request.
    per_step = max(16 - nd, 1)
    cum = 0
    for x, d0 in zip(plen.tolist(), done.tolist()):
        cum += x - d0
        after = alone.decode_steps - max(-(-cum // per_step), 1)
        if after > 0:
            want += -(-(x + min(29, after)) // bs) - (-(-x // bs))
    assert alone.decode.growth == want
    if not victims and p.admit == 0:
        assert p.decode_steps == alone.decode_steps and p.decode.growth <= want
    toks = np.cumsum(np.where(wsw, 0, wl)) + int((plen - done).sum())
    want_admit = int(np.searchsorted(toks, 32, side="right"))
    if npre == 0 and nw:
        want_admit = max(want_admit, 1)
    assert big.admit == min(want_admit, nw)


def _brute_pairs(new, before):
    """Causal pairs counted one query at a time: query j sees before + j + 1 keys."""
    return sum(before + j + 1 for j in range(new))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(0, 30), bs=st.sampled_from([1, 4, 16]),
       steps=st.integers(-2, 40), per_step=st.integers(1, 64), before=st.integers(0, 100))
def test_set_sums_agree_with_brute_force_on_both_paths(data, n, bs, steps, per_step, before):
    """Sets of up to 8 requests are summed in Python, larger ones with numpy: both must
    give what counting request by request gives."""
    plen = data.draw(st.lists(st.integers(1, 200), min_size=n, max_size=n))
    kv = [data.draw(st.integers(0, p - 1)) for p in plen]
    held = [data.draw(st.integers(0, -(-p // bs))) for p in plen]
    gen = data.draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    maxt = [g + data.draw(st.integers(1, 60)) for g in gen]
    pre = RequestSet.from_arrays(ids=np.arange(n), kv_len=kv, prefill_len=plen, generated=gen,
                                 max_tokens=maxt, blocks=held)
    s = prefill_sums(pre, bs)
    assert s.tokens_left == sum(p - k for p, k in zip(plen, kv))
    assert s.attn_pairs == pytest.approx(sum(_brute_pairs(p - k, k) for p, k in zip(plen, kv)))
    assert s.blocks_held == sum(held)
    assert s.blocks_to_come == sum(max(-(-p // bs) - b, 0) for p, b in zip(plen, held))
    want, cum = 0, before
    for p, k0, m, g in zip(plen, kv, maxt, gen):
        cum += p - k0
        handoff = max(-(-cum // per_step), 1)         # the step its prompt completes
        if steps - handoff > 0:
            after = min(max(m - g - 1, 0), steps - handoff)   # tokens decoded after it
            want += -(-(p + after) // bs) - (-(-p // bs))
    assert handoff_growth(pre, steps, per_step, bs, before) == want
    # Decode growth over k steps, per request.
    rem = np.array(data.draw(st.lists(st.integers(0, 80), min_size=n, max_size=n)), np.int64)
    dec = RequestSet.from_arrays(ids=np.arange(n), kv_len=plen, block_size=bs)
    k = max(steps, 0)
    got = decode_growth(decode_set(dec, rem), k, bs)
    assert got.tolist() == [max(-(-(p + min(r, k)) // bs) - (-(-p // bs)), 0)
                            for p, r in zip(plen, rem.tolist())]


def test_prefill_steps_leave_one_token_per_decode_row():
    """A step carries one token per decode request first: 28 prompt tokens with 3 decode
    requests at a 16-token budget take ceil(28 / 13) = 3 steps, not ceil(28 / 16) = 2."""
    _, dec = _sets()
    pre = RequestSet.from_arrays(ids=[20], kv_len=[0], prefill_len=[28], max_tokens=[10],
                                 blocks=[0], admit_seq=[3])
    p = _planner(max_prefill_tokens=64).plan(pre, dec, None, ArenaState(100, 64, 16))
    assert p.prefill_steps == 3
    step = C[0] + 3 * C[3] + 36 * C[4]
    assert p.prefill_window_s == pytest.approx(3 * step + 28 * C[1] + _brute_pairs(28, 0) * C[2])


def test_handoff_growth_counts_each_prompt_from_its_own_handoff():
    """Two prompts chunked 16 tokens a step (no decode set): the 2-token one hands off at
    step 1 and decodes 7 steps of an 8-step window (2 + 7 = 9 tokens: 3 blocks, 2 new); the
    24-token one hands off at step 2 and decodes 6 (30 tokens: 8 blocks, 2 new). Counted
    from the batch's end (step 2) the first would decode 6 (8 tokens: 1 new block)."""
    pre = RequestSet.from_arrays(ids=[20, 21], kv_len=[0, 0], prefill_len=[2, 24],
                                 max_tokens=[50, 50], blocks=[1, 6], admit_seq=[0, 1])
    p = _planner(min_decode_steps=8, max_decode_steps=8).plan(
        pre, RequestSet.empty(), None, ArenaState(100, 64, 16))
    assert p.prefill_steps == 2 and p.decode_steps == 8
    assert p.decode.growth == 2 + 2
    assert handoff_growth(pre, 8, 16, 4) == 4
    # Queued behind 15 more prompt tokens they hand off at steps 2 and 3: 1 + 2 new blocks.
    assert handoff_growth(pre, 8, 16, 4, before=15) == 1 + 2
