"""The simulated GPU of the host replay (bench.step_truth), the planner's prediction error
against it, and map/unmap costs measured on a GPU (bench.measured_costs)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import measured_costs, replay
from bench.step_truth import SimulatedStep, StepTruth, StepWork
from scheduler.latency import DEVICES, MODELS, LatencyModel
from scheduler.loop import Batch

M8, H100 = MODELS["llama-3-8b"], DEVICES["h100-sxm"]


def _quiet(**kw) -> StepTruth:
    return StepTruth(M8, H100, noise_sigma=0.0, **kw)


# ------------------------------------------------------------------------- calibration
def test_decode_of_an_8b_model_on_an_h100_takes_6_to_7_ms_and_the_prior_says_more():
    truth = _quiet()
    t = truth.ideal_seconds(StepWork.decode(1, 1024))
    assert 6e-3 <= t <= 7e-3
    assert truth.calibration()["decode_step_1seq_1k_ctx_ms"] == pytest.approx(t * 1e3)
    # the planner's cold-start prior is deliberately another model (~10 ms)
    prior = LatencyModel.from_hardware(M8, H100).decode_time(1, 1024)
    assert prior > 1.4 * t
    # a faster HBM decodes faster; prefill (GEMM-bound) does not care
    h200 = StepTruth(M8, DEVICES["h200"], noise_sigma=0.0)
    assert h200.ideal_seconds(StepWork.decode(1, 1024)) < 0.75 * t
    assert h200.ideal_seconds(StepWork.prefill(2048)) == pytest.approx(
        truth.ideal_seconds(StepWork.prefill(2048)))


def test_each_kernel_class_is_bounded_by_its_own_roofline():
    truth = _quiet()
    bw = H100.hbm_bandwidth * 0.80
    kv = M8.kv_bytes_per_token
    # a small decode step is memory-bound: weights, KV read (context) and written (1 token)
    t = truth.ideal_seconds(StepWork.decode(2, 3000))
    assert t == pytest.approx(0.5e-3 + M8.weight_bytes / bw + (6000 + 2) * kv / bw)
    # a 2k-token prompt is GEMM-bound; its attention reads 2k tokens and does 2k*2049/2 pairs
    t = truth.ideal_seconds(StepWork.prefill(2048))
    gemm = 2 * M8.num_params * 2048 / (H100.fp16_flops * 0.70)
    attn = max(2 * 2048 * kv / bw,
               2048 * 2049 / 2 * M8.attn_flops_per_pair / (H100.fp16_flops * 0.50))
    assert t == pytest.approx(0.5e-3 + gemm + attn)
    # a mixed step adds the decode rows' KV-bound attention to the GEMM-bound projections:
    # more than a single roofline over the whole step would give
    mixed = StepWork(2048, 2048 * 2049 / 2, 2048, 64, 64 * 8192)
    whole = 0.5e-3 + max((M8.weight_bytes + (2048 + 64 * 8192 + 2048 + 64) * kv) / bw,
                         (2 * M8.num_params * 2112 + (2048 * 2049 / 2 + 64 * 8192)
                          * M8.attn_flops_per_pair) / (H100.fp16_flops * 0.6))
    assert truth.ideal_seconds(mixed) > whole


def test_more_work_never_takes_less_time():
    truth = _quiet()
    rng = np.random.default_rng(3)
    for _ in range(200):
        a = rng.integers(0, 4096, 5).astype(float)
        w = StepWork(*a)
        more = StepWork(*(a + rng.integers(0, 4096, 5)))
        assert truth.ideal_seconds(more) >= truth.ideal_seconds(w)


def test_work_of_a_batch_counts_prompt_chunks_and_decode_rows():
    # a 100-token chunk after 50 cached tokens, and two decode rows at 10 and 20 tokens
    batch = Batch(req_ids=np.array([0, 1, 2]), num_tokens=np.array([100, 1, 1], np.int32),
                  context_lens=np.array([150, 10, 20], np.int32),
                  is_prefill=np.array([True, False, False]),
                  block_table_rows=np.array([0, 1, 2], np.int32),
                  slot_mapping=np.zeros(102, np.int64), positions=np.zeros(102, np.int64),
                  query_start_loc=np.array([0, 100, 101, 102], np.int32))
    w = StepWork.of_batch(batch)
    assert w == StepWork(100, 100 * 50 + 100 * 101 / 2, 150, 2, 30)
    # the planner's features are the loop's own
    assert w.features() == pytest.approx(batch.work())


# ------------------------------------------------------------------------- noise and bias
def test_jitter_is_seeded_mean_one_and_bias_scales():
    work = StepWork.decode(8, 8000)
    ideal = _quiet().ideal_seconds(work)
    a = StepTruth(M8, H100, noise_sigma=0.05, seed=7).step_fn()
    b = StepTruth(M8, H100, noise_sigma=0.05, seed=7).step_fn()
    c = StepTruth(M8, H100, noise_sigma=0.05, seed=8).step_fn()
    xa = np.array([a.seconds(work) for _ in range(20000)])
    xb = np.array([b.seconds(work) for _ in range(20000)])
    xc = np.array([c.seconds(work) for _ in range(50)])
    assert np.array_equal(xa, xb) and not np.array_equal(xa[:50], xc)
    assert xa.mean() == pytest.approx(ideal, rel=2e-3)            # mean-one jitter
    assert np.log(xa).std() == pytest.approx(0.05, rel=0.05)
    slow = StepTruth(M8, H100, noise_sigma=0.0, bias=1.3).step_fn()
    assert slow.seconds(work) == pytest.approx(1.3 * ideal)


@pytest.mark.parametrize("kw, words", [
    (dict(memory_efficiency=0), "memory_efficiency"), (dict(gemm_efficiency=1.5), "gemm"),
    (dict(attention_efficiency=math.nan), "attention"), (dict(step_overhead_s=-1), "overhead"),
    (dict(bias=0), "bias"), (dict(bias=math.inf), "bias"), (dict(noise_sigma=-0.1), "sigma"),
    (dict(noise_sigma=2), "sigma"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed")])
def test_bad_parameters_name_themselves(kw, words):
    with pytest.raises(ValueError, match=words):
        StepTruth(M8, H100, **kw)
    with pytest.raises(TypeError, match="model"):
        StepTruth("llama", H100)
    with pytest.raises(TypeError, match="planner"):
        SimulatedStep(_quiet(), planner="prior")


# ------------------------------------------------------------------------- prediction error
def test_prediction_error_compares_the_planners_prediction_with_the_truth():
    truth = _quiet()
    # a planner that always says 10 ms and never learns (the loop is not feeding it here)
    planner = LatencyModel([10e-3, 0, 0, 0, 0])
    step = truth.step_fn(planner)
    works = [StepWork.decode(1, 1024), StepWork.prefill(1024), StepWork.decode(4, 4000)]
    batches = []
    for w in works:
        n_pre = 1 if w.prefill_tokens else 0
        seqs = n_pre + int(w.decode_seqs)
        per = int(w.decode_context_tokens // max(w.decode_seqs, 1))
        tokens = np.array([int(w.prefill_tokens)] * n_pre + [1] * int(w.decode_seqs), np.int32)
        ctx = np.array([int(w.prefill_tokens)] * n_pre + [per] * int(w.decode_seqs), np.int32)
        batches.append(Batch(np.arange(seqs), tokens, ctx, np.arange(seqs) < n_pre,
                             np.arange(seqs, dtype=np.int32), np.zeros(tokens.sum(), np.int64),
                             np.zeros(tokens.sum(), np.int64),
                             np.concatenate(([0], np.cumsum(tokens))).astype(np.int32)))
    actual = np.array([step(b) for b in batches])
    assert actual == pytest.approx([truth.ideal_seconds(w) for w in works])
    rel = (10e-3 - actual) / actual * 100
    e = step.prediction_error()
    assert e["steps"] == 3
    assert e["mape_pct"] == pytest.approx(np.abs(rel).mean())
    assert e["bias_pct"] == pytest.approx(rel.mean())
    assert e["mape_with_prefill_pct"] == pytest.approx(abs(rel[1]))
    assert e["mape_decode_only_pct"] == pytest.approx(np.abs(rel[[0, 2]]).mean())
    assert truth.step_fn().prediction_error()["mape_pct"] is None     # nothing to score


def test_replay_steps_take_the_truths_time_and_report_the_planners_error(tmp_path):
    """A lone request: one prefill step and decode steps whose durations are the truth's
    (model time in the counters), not the planner's prior; a slower GPU (bias) slows it."""
    from bench.traces import Trace

    trace = Trace("one", "test", np.array([0.0]), np.array([300]), np.array([20]))

    def run(**kw):
        setup = replay.build_setup(max_tokens=64, step_noise=0.0, arena_costs_dir=None, **kw)
        return setup, replay.run_policy(setup, trace, "on-demand", progress=False)

    setup, rec = run()
    truth = setup.step_truth()
    works = [StepWork.prefill(300)] + [StepWork.decode(1, 300 + i) for i in range(1, 20)]
    expected = sum(truth.ideal_seconds(w) for w in works)
    assert rec.counters["model_time_s"] == pytest.approx(expected)
    prior = LatencyModel.from_hardware(setup.model, setup.device)
    assert rec.counters["model_time_s"] < 0.8 * sum(prior.predict_step(*w.features())
                                                     for w in works)
    e = rec.info["latency_prediction"]
    assert e["steps"] == rec.info["steps"] == 20
    assert e["bias_pct"] > 20       # cold: the pessimistic prior over-predicts
    _, slow = run(step_bias=2.0)
    assert slow.counters["model_time_s"] == pytest.approx(2 * expected)


def test_a_seed_replays_identically_and_another_seed_differs(tmp_path):
    from bench.traces import Trace

    rng = np.random.default_rng(2)
    trace = Trace("few", "test", np.sort(rng.uniform(0, 0.2, 8)), rng.integers(50, 300, 8),
                  rng.integers(5, 40, 8))

    def model_time(seed):
        setup = replay.build_setup(max_tokens=64, seed=seed, arena_costs_dir=None)
        return replay.run_policy(setup, trace, "windowed:oracle",
                                 progress=False).counters["model_time_s"]

    assert model_time(3) == model_time(3) != model_time(4)


def test_describe_reports_the_truth_apart_from_the_planners_prior():
    setup = replay.build_setup(step_bias=1.1, step_noise=0.02, seed=5, arena_costs_dir=None)
    d = setup.describe()
    truth, prior = d["step_truth"], d["latency_model"]
    assert (truth["bias"], truth["noise_sigma"], truth["seed"]) == (1.1, 0.02, 5)
    cal = truth["calibration_noise_free"]["decode_step_1seq_1k_ctx_ms"]
    assert 6 <= cal <= 7 and prior["decode_step_1seq_1k_ctx_ms"] > 9
    assert set(truth["sources"]) >= {"memory_efficiency", "step_overhead_s",
                                     "gemm_efficiency", "attention_efficiency"}
    assert "prior" in prior["role"]
    with pytest.raises(ValueError, match="bias"):
        replay.build_setup(step_bias=-1, arena_costs_dir=None)


# ------------------------------------------------------------------------- measured costs
def _arena_json(folder, device, date, map_s, unmap_s, error=False):
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"environment": {"device": device, "date_utc": date},
           "map_unmap": ({"error": "RuntimeError: boom"} if error else
                         {"chunk_bytes": 2 << 20, "chunks": 64, "map_s_median": map_s,
                          "unmap_s_median": unmap_s})}
    (folder / "arena.json").write_text(json.dumps(doc))
    return folder / "arena.json"


@pytest.mark.parametrize("name, preset", [
    ("NVIDIA H200", "h200"), ("NVIDIA H200 NVL", "h200"), ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None), ("NVIDIA A100-SXM4-80GB", "a100-80g"),
    ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA L40S", "l40s"), ("cpu (x86_64)", None)])
def test_cuda_device_names_map_to_presets(name, preset):
    assert measured_costs.preset_for_device_name(name) == preset


def test_measured_map_unmap_costs_replace_the_assumed_ones_for_their_device(tmp_path):
    _arena_json(tmp_path / "gpu" / "h200-20261201", "NVIDIA H200", "2026-12-01T03:00:00+00:00",
                55e-6, 45e-6)
    newest = _arena_json(tmp_path / "gpu" / "h200-20261202", "NVIDIA H200",
                         "2026-12-02T03:00:00+00:00", 61e-6, 47e-6)
    _arena_json(tmp_path / "gpu" / "h200-20261203", "NVIDIA H200", "2026-12-03T03:00:00+00:00",
                0, 0, error=True)                          # a failed run: skipped
    (tmp_path / "gpu" / "broken").mkdir()
    (tmp_path / "gpu" / "broken" / "arena.json").write_text("{not json")
    setup = replay.build_setup(device="h200", arena_costs_dir=tmp_path)
    cm = setup.cost_model()
    assert (cm.map_s_per_chunk, cm.unmap_s_per_chunk) == (61e-6, 47e-6)
    cost = setup.describe()["arena_cost_model"]
    assert cost["map_unmap_source"].startswith("measured: ")
    assert str(newest) in cost["map_unmap_source"] and "2026-12-02" in cost["map_unmap_source"]
    assert cost["map_per_chunk_us"] == pytest.approx(61) and "assumed" not in cost["source"]
    assert any("measured on NVIDIA H200" in ln for ln in replay.header_lines(
        setup, replay.load_trace(None).head(3)))
    # another device, or no folder: the assumed constants, labelled so
    for other in (replay.build_setup(device="h100-sxm", arena_costs_dir=tmp_path),
                  replay.build_setup(device="h200", arena_costs_dir=None),
                  replay.build_setup(device="h200", arena_costs_dir=tmp_path / "missing")):
        cm = other.cost_model()
        assert (cm.map_s_per_chunk, cm.unmap_s_per_chunk) == (40e-6, 30e-6)
        assert other.describe()["arena_cost_model"]["map_unmap_source"] == "assumed"


def test_the_cli_charges_measured_costs_and_says_so(tmp_path):
    from tests.test_replay_cli import TINY, _trace

    _arena_json(tmp_path / "res" / "gpu" / "x", "NVIDIA H100 80GB HBM3", "2026-12-01", 80e-6,
                60e-6)
    out = tmp_path / "o"
    # every map on the step loop (no mapper), so time_map_s holds them all
    argv = ["--trace", str(_trace(tmp_path)), "--out", str(out), *TINY, "--mapper", "off"]
    assert replay.main([*argv, "--arena-costs-dir", str(tmp_path / "res")]) == 0
    doc = json.loads((out / "replay.json").read_text())
    cost = doc["setup"]["arena_cost_model"]
    assert cost["map_unmap_source"].startswith("measured") and cost["map_per_chunk_us"] == 80
    od = {p["policy"]: p for p in doc["policies"]}["on-demand"]
    # each map call is one chunk (plus the per-operation overhead, charged to map too)
    assert od["counters"]["time_map_s"] >= od["map_calls"] * 80e-6
    assert replay.main([*argv, "--arena-costs-dir", "none"]) == 0
    doc = json.loads((out / "replay.json").read_text())
    assert doc["setup"]["arena_cost_model"]["map_unmap_source"] == "assumed"


def test_scoring_samples_steps_and_changes_nothing_the_loop_sees(monkeypatch):
    from bench.traces import Trace

    rng = np.random.default_rng(6)
    trace = Trace("few", "test", np.sort(rng.uniform(0, 0.1, 6)), rng.integers(50, 300, 6),
                  rng.integers(20, 60, 6))
    setup = replay.build_setup(max_tokens=64, arena_costs_dir=None)
    runs = {}
    for every in (1, 8):
        monkeypatch.setattr(replay, "SCORE_EVERY", every)
        runs[every] = replay.run_policy(setup, trace, "windowed:empirical", progress=False)
    def simulated(c):     # every counter but the host's own wall-clock seconds
        return {k: v for k, v in c.items() if not k.endswith("wall_s")}

    assert simulated(runs[1].counters) == simulated(runs[8].counters)
    assert np.array_equal(runs[1].finish_s, runs[8].finish_s)
    n = runs[1].info["steps"]
    assert n > 40
    assert runs[1].info["latency_prediction"]["steps"] == n
    # the first 32 steps, then steps 40, 48, ...
    assert runs[8].info["latency_prediction"]["steps"] == 32 + (n // 8 - 4)
    assert runs[8].info["latency_prediction"]["steps_run"] == n
    with pytest.raises(ValueError, match="score_every"):
        _quiet().step_fn(score_every=0)
