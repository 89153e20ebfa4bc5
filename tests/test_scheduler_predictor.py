"""Remaining-length predictors: bounds, the empirical conditional quantile, the oracle."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.predictor import (EmpiricalPredictor, MaxTokensPredictor, OraclePredictor,
                                 make_predictor)


def test_max_tokens_is_the_upper_bound():
    p = MaxTokensPredictor()
    r = p.predict(np.arange(3), np.array([0, 5, 9]), np.array([10, 10, 10]))
    assert r.tolist() == [10, 5, 1]


def _brute_force(lengths, g, maxt, q):
    above = np.sort([x for x in lengths if x > g])
    if above.size == 0:
        return maxt - g
    k = max(int(np.ceil(q * above.size)) - 1, 0)
    return int(min(max(above[k] - g, 1), maxt - g))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=16, max_size=200),
       q=st.sampled_from([0.5, 0.9, 1.0]),
       gen=st.lists(st.integers(0, 320), min_size=1, max_size=30),
       maxt=st.integers(1, 400))
def test_empirical_is_the_conditional_quantile(lengths, q, gen, maxt):
    p = EmpiricalPredictor(q, window=1000, min_samples=16)
    for x in lengths:
        p.observe_finished(x, 512)
    g = np.array([min(x, maxt - 1) for x in gen], dtype=np.int64)
    m = np.full(g.shape, maxt, dtype=np.int64)
    got = p.predict(np.arange(g.size), g, m)
    want = [_brute_force(lengths, int(gi), maxt, q) for gi in g]
    assert got.tolist() == want
    assert np.all(got >= 1) and np.all(got <= m - g)


def test_empirical_cold_start_window_and_cap():
    p = EmpiricalPredictor(0.5, window=4, min_samples=4)
    g, m = np.array([0, 0]), np.array([100, 10])
    assert p.predict(None, g, m).tolist() == [100, 10]         # cold: max_tokens
    for x in (20, 20, 20, 20):
        p.observe_finished(x, 100)
    assert p.predict(None, g, m).tolist() == [20, 10]          # capped by max_tokens
    for x in (50, 50, 50, 50):                                  # the window forgets the 20s
        p.observe_finished(x, 100)
    assert p.num_samples == 4
    assert p.predict(None, np.array([0, 60]), np.array([100, 100])).tolist() == [50, 40]


def test_oracle_knows_the_truth_and_unknown_ids_fall_back():
    p = OraclePredictor({3: 7})
    p.reveal(10, 40)
    r = p.predict(np.array([3, 10, 11]), np.array([2, 5, 1]), np.array([100, 20, 9]))
    assert r.tolist() == [5, 15, 8]


def test_make_predictor():
    assert isinstance(make_predictor("empirical"), EmpiricalPredictor)
    custom = MaxTokensPredictor()
    assert make_predictor(custom) is custom
    with pytest.raises(ValueError, match="predictor"):
        make_predictor("psychic")
    with pytest.raises(TypeError):
        make_predictor(42)
    with pytest.raises(ValueError, match="quantile"):
        EmpiricalPredictor(0.0)
