"""The planner after its speed rewrite decides exactly what it decided before.

``_planner_reference.py`` is a frozen copy of ``scheduler/planner.py`` from before the
rewrite (commit 70e61d2). On random states -- running prefill, decode and waiting sets of
0 to 50 requests (both sides of every small-set threshold), scarce and plentiful supply,
window ends or not, every predictor, victim order and preemption mode -- both planners
must return the same :class:`Plan`, field by field: same values, same Python types, same
array dtypes, and neither may change its inputs.
"""
import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

import _planner_reference as reference
from scheduler import planner as current
from scheduler.latency import LatencyModel
from scheduler.predictor import EmpiricalPredictor, OraclePredictor
from scheduler.request import RequestSet

_COEFS = [(1e-2, 1e-4, 1e-6, 1e-3, 1e-5), (2e-3, 3e-7, 1e-10, 4e-5, 2e-8),
          (0.0, 1e-4, 0.0, 0.0, 1e-5)]


class _HalfPredictor:
    """A predictor that is not a PredictorBase (the planner adds the defaults): half of
    what max_tokens allows, rounded up."""

    def predict(self, ids, generated, max_tokens):
        return -(-np.maximum(max_tokens - generated, 0) // 2)

    def observe_finished(self, generated, max_tokens):
        pass


def _ints(draw, n, lo, hi):
    return np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), np.int64)


@st.composite
def _states(draw, admitting=False):
    """One planning problem: the planner's settings and the arguments of ``plan``.
    ``flood``: a long queue of short prompts and room for all of them (many candidates to
    price); ``swapped``: a swapped-out request at the head of the queue. ``admitting``:
    a queue is waiting and neither the token budget nor ``max_running`` keeps it out."""
    shape = draw(st.sampled_from(["any", "any", "flood", "swapped"]))
    bs = draw(st.sampled_from([1, 4, 16, 5]))
    cfg = dict(block_size=bs, block_bytes=draw(st.sampled_from([1, 1024, 2 ** 20])),
               token_budget=draw(st.integers(1, 96)),
               max_prefill_tokens=draw(st.sampled_from([1, 16, 64, 256, 4096])),
               max_running=draw(st.integers(1, 120)),
               min_decode_steps=draw(st.integers(1, 4)),
               margin_fraction=draw(st.sampled_from([0.0, 0.02, 0.1, 1.5])),
               margin_blocks=draw(st.sampled_from([0, 1, 3])),
               shrink_min_blocks=draw(st.sampled_from([None, 0, 5])),
               arrival_reserve_s=draw(st.sampled_from([0.0, 0.25])),
               victim=draw(st.sampled_from(["most-recent", "most-blocks",
                                            "longest-remaining"])),
               preemption=draw(st.sampled_from(["auto", "swap", "recompute"])))
    cfg["max_decode_steps"] = cfg["min_decode_steps"] + draw(st.integers(0, 12))
    big = draw(st.booleans()) and shape != "flood"   # long prompts and contexts, or short
    top = 3000 if big else 80
    if shape == "flood":
        cfg.update(max_prefill_tokens=4096, max_running=120)
    if admitting:
        cfg.update(max_prefill_tokens=draw(st.sampled_from([256, 4096])), max_running=200)

    nd = draw(st.integers(0, 10 if shape == "flood" else 50))
    kv = _ints(draw, nd, 1, top)
    gen = np.minimum(_ints(draw, nd, 1, 60), kv)
    maxt = gen + _ints(draw, nd, 0, 90)
    held = -(-kv // bs)
    if draw(st.booleans()):       # blocks held off the exact count, either way
        held = np.maximum(held + _ints(draw, nd, -2, 2), 0)
    dec = RequestSet.from_arrays(ids=np.arange(nd), kv_len=kv, generated=gen, max_tokens=maxt,
                                 blocks=held, admit_seq=_ints(draw, nd, -1, 200))

    npre = draw(st.integers(0, 5 if shape == "flood" else 50))
    if admitting and draw(st.booleans()):
        npre = 0                  # no batch in flight: the first prompt pays its margin
    plen = _ints(draw, npre, 1, top)
    done = np.array([draw(st.integers(0, int(x) - 1)) for x in plen], np.int64)
    pgen = _ints(draw, npre, 0, 5)
    pre = RequestSet.from_arrays(ids=1000 + np.arange(npre), kv_len=done, prefill_len=plen,
                                 generated=pgen, max_tokens=pgen + _ints(draw, npre, 1, 90),
                                 blocks=np.minimum(-(-done // bs) + _ints(draw, npre, 0, 1),
                                                   -(-plen // bs)),
                                 admit_seq=300 + np.arange(npre))

    wait = None
    if draw(st.integers(0, 5)) or shape != "any" or admitting:
        nw = draw(st.integers(40 if shape == "flood" else int(admitting), 60))
        wl = _ints(draw, nw, 1, top)
        wsw = np.array(draw(st.lists(st.booleans(), min_size=nw, max_size=nw)), bool)
        mix = draw(st.sampled_from(["none", "some", "head", "one prompt"]))
        if mix == "none":
            wsw[:] = False        # the common case: no swapped entry waits
        elif mix == "one prompt" and nw:
            wsw[:] = True         # ... or all but one, after a wave of swap preemptions
            wsw[draw(st.integers(0, min(nw, 3) - 1))] = False
        if (mix == "head" or shape == "swapped") and nw:
            wsw[0] = True         # a swapped entry at the head of the queue
        wgen = np.where(wsw, np.minimum(wl, _ints(draw, nw, 1, 40)), 0)
        wait = RequestSet.from_arrays(
            ids=2000 + np.arange(nw), kv_len=np.where(wsw, wl, 0), prefill_len=wl,
            generated=wgen, max_tokens=wgen + _ints(draw, nw, 1, 90),
            blocks=np.zeros(nw, np.int64), admit_seq=np.where(wsw, 500 + np.arange(nw), -1),
            swapped=wsw)

    need = int(dec.blocks.sum() + pre.blocks.sum())
    scale = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0, 1.1, 2.0, 10.0]))
    supply = max(int(need * scale) + draw(st.integers(-5, 40)), 0)
    if draw(st.integers(0, 5)) == 0 or shape != "any":
        supply = 10 ** 7          # room for the whole queue
    arena = dict(supply_blocks=supply, mapped_blocks=draw(st.integers(0, 2 * supply + 50)),
                 blocks_per_chunk=draw(st.sampled_from([1, 4, 16])))
    now = draw(st.sampled_from([0.0, 3.5]))
    arrival = draw(st.sampled_from([math.inf, now, now + 0.01, now + 0.3, now + 5.0]))
    kw = dict(now_s=now, next_arrival_s=arrival, window_end=draw(st.booleans()),
              admission_rate_blocks_s=draw(st.sampled_from([0.0, 3.0, 250.0])))
    predictor = draw(st.sampled_from(["max_tokens", "empirical", "cold", "oracle", "half"]))
    lengths = _ints(draw, 30, 1, 150)
    coef = draw(st.sampled_from(_COEFS))
    return dict(cfg=cfg, sets=(pre, dec, wait), arena=arena, kw=kw, predictor=predictor,
                lengths=lengths, coef=coef)


def _predictor(state):
    name, lengths = state["predictor"], state["lengths"].tolist()
    if name in ("empirical", "cold"):
        p = EmpiricalPredictor(0.8)
        for x in lengths[:5] if name == "cold" else lengths:   # cold: under min_samples
            p.observe_finished(x, 200)
        return p
    if name == "oracle":
        # Some requests' true lengths are known, the rest fall back to max_tokens.
        return OraclePredictor({rid: n for rid, n in zip(range(0, 2100, 37), lengths)})
    return _HalfPredictor() if name == "half" else "max_tokens"


def _plan(module, state, patch=None):
    predictor = _predictor(state)
    planner = module.WindowPlanner(LatencyModel(state["coef"]), predictor,
                                   module.PlannerConfig(**state["cfg"]))
    if patch is not None:
        patch(planner)
    pre, dec, wait = state["sets"]
    return planner.plan(pre, dec, wait, module.ArenaState(**state["arena"]), **state["kw"])


def _differences(a, b) -> list[str]:
    """Fields of two plans (current, reference) that are not identical."""
    out = []
    for f in dataclasses.fields(reference.Plan):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(y, np.ndarray):
            same = (isinstance(x, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
                    and bool(np.array_equal(x, y)))
        elif isinstance(y, reference.Demand):
            same = all(type(getattr(x, g)) is type(getattr(y, g))
                       and getattr(x, g) == getattr(y, g)
                       for g in ("static", "growth", "margin"))
        else:
            same = type(x) is type(y) and x == y
        if not same:
            out.append(f"{f.name}: {x!r} != {y!r}")
    return out


def _compare(state, patch=None) -> list[str]:
    pre, dec, wait = state["sets"]
    before = [getattr(s, f.name).copy() for s in (pre, dec, wait) if s is not None
              for f in dataclasses.fields(RequestSet)]
    got = _plan(current, state, patch)
    after = [getattr(s, f.name) for s in (pre, dec, wait) if s is not None
             for f in dataclasses.fields(RequestSet)]
    assert all(np.array_equal(x, y) for x, y in zip(before, after)), "plan changed its input"
    return _differences(got, _plan(reference, state))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(state=_states())
def test_plans_are_identical_to_the_reference(state):
    assert _compare(state) == []


def test_the_states_reach_every_branch_of_the_plan():
    """The generator is not idle: among a few hundred states some admit (with and without
    swapped entries), some preempt, some fall short, some shrink."""
    seen = set()

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(state=_states())
    def collect(state):
        p = _plan(current, state)
        wait = state["sets"][2]
        if p.admit:
            seen.add("admit")
            if wait.swapped[:p.admit].any():
                seen.add("admit swapped")
            if p.admit > 40:
                seen.add("admit many")
        if p.preempt_ids.size:
            seen.add("preempt")
        if not p.fits:
            seen.add("short")
        if p.shrink:
            seen.add("shrink")

    collect()
    assert seen >= {"admit", "admit swapped", "admit many", "preempt", "short", "shrink"}


@pytest.mark.parametrize("bug", ["window", "shrink"])
def test_a_planted_bug_is_caught(bug):
    """The comparison can fail: a planner whose window is one step shorter, or whose
    shrink keeps one block more in reserve, differs from the reference on some state."""
    def patch(planner):
        if bug == "window":
            step = planner.window

            def window(*a, **kw):
                w = step(*a, **kw)
                return w._replace(k=max(w.k - 1, 1))
            planner.window = window
        else:
            decide = planner.shrink_decision

            def shrink_decision(*a, **kw):
                shrink, reserve = decide(*a, **kw)
                return shrink, reserve + 1
            planner.shrink_decision = shrink_decision

    found = find(_states(), lambda s: bool(_compare(s, patch)),
                 settings=settings(max_examples=500, database=None, deadline=None,
                                   phases=[Phase.generate],   # any failing state will do
                                   suppress_health_check=list(HealthCheck)))
    assert _compare(found, patch)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(state=_states(admitting=True), start=st.integers(-3, 3))
def test_plans_are_identical_across_a_sweep_of_supplies(state, start):
    """Admission and preemption decide at block boundaries (a cost equal to what is left,
    a margin block more or less): sweep the supply one block at a time around the running
    sets' demand so those boundaries are met, not just sampled."""
    pre, dec, wait = state["sets"]
    alone = _plan(reference, dict(state, sets=(pre, dec, None)))
    base = alone.prefill_target + alone.decode_target
    for supply in range(max(base + start - 12, 0), base + start + 80):
        s = dict(state, arena=dict(state["arena"], supply_blocks=supply))
        assert _compare(s) == [], f"supply {supply}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=st.data(), n=st.integers(0, 70), bs=st.sampled_from([1, 2, 3, 16]),
       before=st.integers(0, 40), huge=st.booleans())
def test_set_functions_are_identical_to_the_reference(data, n, bs, before, huge):
    """prefill_sums, handoff_growth and decode_growth on both sides of the list/array
    threshold, with small numbers (every window length and tokens per step, so hand-offs
    land exactly on window boundaries) or huge ones (causal-pair sums past 2**52, where
    only the old float order gives the old value)."""
    top = 2 ** 31 if huge else 12
    plen = _ints(data.draw, n, 1, top)
    kv = np.array([data.draw(st.integers(0, int(p))) for p in plen], np.int64)
    held = np.array([data.draw(st.integers(0, -(-int(p) // bs) + 1)) for p in plen], np.int64)
    gen = _ints(data.draw, n, 0, 5)
    pre = RequestSet.from_arrays(ids=np.arange(n), kv_len=kv, prefill_len=plen,
                                 generated=gen, max_tokens=gen + _ints(data.draw, n, 0, 12),
                                 blocks=held)
    got, want = current.prefill_sums(pre, bs), reference.prefill_sums(pre, bs)
    assert got == want and [type(x) for x in got] == [type(x) for x in want]
    for k in range(-1, 21):
        for per_step in range(1, 10):
            assert (current.handoff_growth(pre, k, per_step, bs, before)
                    == reference.handoff_growth(pre, k, per_step, bs, before)), (k, per_step)
    rem = _ints(data.draw, n, 0, 30)
    dec = RequestSet.from_arrays(ids=np.arange(n), kv_len=plen, blocks=held)
    for k in range(0, 33, 4):
        assert np.array_equal(current.decode_growth(current.decode_set(dec, rem), k, bs),
                              reference.decode_growth(reference.decode_set(dec, rem), k, bs))
