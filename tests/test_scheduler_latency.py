"""Processing-duration model: hardware prior, online least squares, presets."""
import math

import numpy as np
import pytest

from scheduler.latency import (DEVICES, MODELS, DeviceSpec, LatencyModel, ModelShape,
                               prefill_attn_pairs)


def test_presets_match_the_published_shapes():
    m = MODELS["llama-3-8b"]
    assert (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim) == \
        (32, 4096, 32, 8, 128)
    assert m.dtype_bytes == 2 and m.num_params == pytest.approx(8.03e9)
    # 32 layers x K,V x 8 heads x 128 x 2 bytes = 128 KiB per token
    assert m.kv_bytes_per_token == 131072
    big = MODELS["llama-3-70b"]
    assert big.num_params > 6e10 and big.num_layers == 80
    h100, h200 = DEVICES["h100-sxm"], DEVICES["h200"]
    assert h100.hbm_bandwidth == 3.35e12 and h100.fp16_flops == 989e12
    assert h200.hbm_bandwidth == 4.8e12 and h200.memory_bytes > h100.memory_bytes
    assert "a100-80g" in DEVICES


def test_kv_spec_from_model_shape():
    import torch

    spec = MODELS["llama-3-8b"].kv_spec(block_size=16)
    assert spec.token_bytes == MODELS["llama-3-8b"].kv_bytes_per_token
    assert spec.block_bytes == 16 * 131072 and spec.dtype == torch.float16


def test_from_hardware_is_a_roofline():
    m, d = MODELS["llama-3-8b"], DEVICES["h100-sxm"]
    lat = LatencyModel.from_hardware(m, d, efficiency=0.5, step_overhead_s=1e-3)
    bw, fl = d.hbm_bandwidth * 0.5, d.fp16_flops * 0.5
    # An empty decode step reads the weights once.
    assert lat.decode_time(0, 0) == pytest.approx(m.weight_bytes / bw + 1e-3)
    # 64 sequences with 1,000 tokens each read 64,000 tokens of KV more.
    extra = lat.decode_time(64, 64_000) - lat.decode_time(0, 0)
    assert extra == pytest.approx(64_000 * m.kv_bytes_per_token / bw + 64 * 2 * m.num_params / fl)
    # A 2,048-token prompt: 2 * params FLOPs per token plus causal attention pairs.
    pairs = prefill_attn_pairs(np.array([2048]), np.array([0]))
    assert pairs == 2048 * 2049 / 2
    t = lat.prefill_time(2048, pairs) - lat.decode_time(0, 0)
    assert t == pytest.approx((2 * m.num_params * 2048 + 4 * 32 * 32 * 128 * pairs) / fl)
    # Plausible magnitudes for an 8B model on an H100: decode step ~10 ms, prefill ~100 ms.
    assert 5e-3 < lat.decode_time(64, 64_000) < 3e-2
    assert 3e-2 < lat.prefill_time(2048, pairs) < 0.2


def test_online_fit_recovers_true_coefficients_and_forgets_old_ones():
    rng = np.random.default_rng(0)
    true = np.array([5e-3, 2e-5, 1e-9, 3e-5, 4e-8])
    lat = LatencyModel([1e-2, 1e-4, 1e-8, 1e-4, 1e-7], window=64, prior_weight=1e-6)
    assert lat.predict_step(10, 0, 0, 0) == pytest.approx(1e-2 + 1e-3)   # cold: the prior

    def feed(coef, n):
        for _ in range(n):
            x = np.array([1.0, rng.integers(0, 2048), 0.0, rng.integers(0, 256),
                          rng.integers(0, 200_000)])
            x[2] = x[1] * x[1] / 2
            lat.observe(*x[1:], float(coef @ x))

    feed(true, 64)
    assert np.allclose(lat.coef, true, rtol=1e-3)
    assert lat.decode_time(128, 100_000) == pytest.approx(true[0] + 128 * true[3] + 4e-3,
                                                          rel=1e-3)
    # The window slides: after 64 steps of a faster device, the old data is gone.
    feed(true / 2, 64)
    assert np.allclose(lat.coef, true / 2, rtol=1e-3)
    assert lat.num_observations == 128


def test_prior_holds_features_the_data_never_varies():
    lat = LatencyModel([1e-2, 1e-4, 1e-8, 1e-4, 1e-7], window=32, prior_weight=1.0)
    for i in range(32):  # decode-only data: prefill coefficients keep their prior
        lat.observe(0, 0, 8 + i, 1000 * (i + 1), 2e-2 + 1e-4 * (8 + i) + 1e-7 * 1000 * (i + 1))
    c = lat.coef
    assert c[1] == pytest.approx(1e-4) and c[2] == pytest.approx(1e-8)
    assert np.all(c >= 0)


@pytest.mark.parametrize("bad", [dict(prior=[1, 2]), dict(prior=[-1, 0, 0, 0, 0]),
                                 dict(prior=[0, 0, 0, 0, math.nan]),
                                 dict(prior=[0] * 5, window=2),
                                 dict(prior=[0] * 5, prior_weight=-1)])
def test_bad_arguments_raise(bad):
    with pytest.raises(ValueError):
        LatencyModel(**bad)


def test_bad_shapes_and_observations_raise():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape("x", 2, 64, 6, 4, 16, 1e6)
    with pytest.raises(ValueError, match="hbm_bandwidth"):
        DeviceSpec("x", 1, 0.0, 1.0)
    with pytest.raises(TypeError):
        LatencyModel.from_hardware("llama", DEVICES["h200"])
    with pytest.raises(ValueError, match="efficiency"):
        LatencyModel.from_hardware(MODELS["llama-3-8b"], DEVICES["h200"], efficiency=0)
    lat = LatencyModel([1e-3] * 5)
    with pytest.raises(ValueError, match="duration_s"):
        lat.observe(1, 1, 1, 1, -1.0)


def test_nonnegative_least_squares_is_the_constrained_optimum():
    import itertools

    from scheduler.latency import nonnegative_least_squares

    rng = np.random.default_rng(4)
    for _ in range(150):
        m, n = int(rng.integers(6, 20)), int(rng.integers(1, 6))
        a, b = rng.normal(size=(m, n)), rng.normal(size=m)
        best = np.inf    # the best feasible least-squares fit over every support
        for k in range(n + 1):
            for sup in itertools.combinations(range(n), k):
                z = np.zeros(n)
                if sup:
                    z[list(sup)] = np.linalg.lstsq(a[:, list(sup)], b, rcond=None)[0]
                if np.all(z >= -1e-12):
                    best = min(best, float(np.linalg.norm(a @ z - b)))
        for exact in (True, False):
            for guess in (None, rng.random(n) < 0.5):
                x = nonnegative_least_squares(a.T @ a, a.T @ b, exact=exact, guess=guess)
                assert np.all(x >= 0)
                assert np.linalg.norm(a @ x - b) <= best + 1e-9


def test_a_slope_pinned_at_zero_does_not_bias_the_other_coefficients():
    """Steps get *faster* with more sequences in this data (a negative slope the fit may not
    take): the constrained fit pins that slope at 0 and refits the rest, so it stays
    unbiased on average; clipping an unconstrained fit would over-predict every step."""
    rng = np.random.default_rng(5)
    lat = LatencyModel([1e-2, 1e-5, 1e-9, 1e-5, 1e-7], window=256, prior_weight=1e-3)
    ys = []
    for _ in range(256):
        seqs = float(rng.integers(1, 64))
        ctx = seqs * float(rng.integers(200, 3000)) + float(rng.integers(0, 50_000))
        y = 6e-3 + 5e-8 * ctx - 4e-5 * seqs
        lat.observe(0, 0, seqs, ctx, y)
        ys.append((seqs, ctx, y))
    assert lat.coef[3] == 0.0 and np.all(lat.coef >= 0)
    rel = np.array([lat.decode_time(s, c) / y - 1 for s, c, y in ys])
    assert abs(rel.mean()) < 0.01          # clipping: +15%
