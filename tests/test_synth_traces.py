"""The long-prompt, short-output trace synthesizer: shape, seeding, bursts, gaps, CSV."""
import numpy as np
import pytest

from bench.synth_traces import LongPromptShape, main, synthesize, write_trace
from bench.traces import load_trace


def test_poisson_trace_has_the_stated_shape_and_idle_gaps():
    tr = synthesize(1200.0, "poisson", seed=1)
    rate = len(tr) / tr.duration_s
    assert 2.0 < rate < 3.0
    assert 1800 < np.median(tr.prompt_tokens) < 2300
    assert 25 <= np.median(tr.output_tokens) <= 36
    assert tr.prompt_tokens.min() >= 256 and tr.output_tokens.min() >= 2
    gaps = np.diff(tr.arrival_s)
    assert (gaps >= 0).all()
    # Idle gaps: several silences longer than 5 s (a Poisson process at ~3.8 req/s has
    # essentially none: P(gap > 5 s) = e^-19).
    assert (gaps > 5.0).sum() >= 5


def test_same_seed_same_trace_and_bursty_is_burstier():
    a, b = synthesize(600.0, "bursty", seed=3), synthesize(600.0, "bursty", seed=3)
    assert np.array_equal(a.arrival_s, b.arrival_s)
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert not np.array_equal(a.arrival_s, synthesize(600.0, "bursty", seed=4).arrival_s)
    no_gaps = LongPromptShape(idle_s=0.0)
    cv = {m: float(np.std(g) / np.mean(g)) for m in ("poisson", "bursty")
          for g in [np.diff(synthesize(600.0, m, seed=0, shape=no_gaps).arrival_s)]}
    assert 0.85 < cv["poisson"] < 1.15
    assert cv["bursty"] > 1.6


def test_written_csv_loads_back_identically(tmp_path):
    tr = synthesize(60.0, "poisson", seed=0)
    p = write_trace(tr, tmp_path / "t.csv")
    back = load_trace(p)
    assert np.allclose(back.arrival_s, tr.arrival_s, atol=1e-6)
    assert np.array_equal(back.prompt_tokens, tr.prompt_tokens)
    assert np.array_equal(back.output_tokens, tr.output_tokens)
    assert main(["--out", str(tmp_path / "cli"), "--arrival", "bursty", "--seed", "5",
                 "--duration-s", "30"]) == 0
    assert len(load_trace(tmp_path / "cli" / "long_prompt_bursty_s5.csv")) >= 1


@pytest.mark.parametrize("kw, name", [
    (dict(duration_s=0.0), "duration_s"), (dict(duration_s=10.0, arrival="uniform"), "arrival"),
    (dict(duration_s=10.0, seed=-1), "seed")])
def test_bad_arguments_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        synthesize(**kw)
    with pytest.raises(ValueError, match="rate_req_s"):
        LongPromptShape(rate_req_s=0.0)
    with pytest.raises(ValueError, match="prompt_range"):
        LongPromptShape(prompt_range=(10, 5))
