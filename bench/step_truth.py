"""The simulated GPU a host replay runs on: how long a model step *really* takes.

The replay's engine loop plans with :class:`scheduler.LatencyModel` (linear, fitted online,
cold-started from :meth:`~scheduler.LatencyModel.from_hardware`). The durations it observes
come from this module instead, a different model with noise, so the planner's predictions
have an error to live with, as on a real GPU.

Step time (seconds), a roofline per kernel class::

    t = overhead + max(weight_bytes / BW, gemm_flops / F_gemm)          projections, MLP
                 + max(kv_bytes / BW, attn_pairs * flops_per_pair / F_attn)   attention

with ``BW = HBM bandwidth x memory_efficiency``, ``F_x = peak fp16 FLOP/s x x_efficiency``,
``gemm_flops = 2 x params x tokens`` (every token of the step, prompt or decode),
``kv_bytes = (K/V tokens read by attention + K/V tokens written) x kv_bytes_per_token``
(read: every sequence's context, prompt chunks included; written: the step's tokens) and
``attn_pairs`` the (query, key) pairs (causal prompt chunks plus one query per decode row
over its context). GEMMs and attention run as separate kernels one after the other, so each
class is bounded by its own roofline and their times add; when both sit on the same side of
the ridge this equals ``overhead + max(all bytes / BW, all FLOPs / F)``. Activation traffic,
norms, rotary embedding and sampling are left out (a few % of the bytes at the batch sizes
replayed), as is the L2 reuse of K/V shared by grouped query heads.

Constants (the defaults of :class:`StepTruth`), with where they come from:

* ``memory_efficiency = 0.80`` of nominal HBM bandwidth. gpt-fast measured Llama-2-7B fp16
  decoding at batch 1 at 1,397 GB/s end to end on an A100-80GB whose reachable peak it found
  to be "about 1700 GB/s", 83% of the 2,039 GB/s nominal
  (https://github.com/pytorch-labs/gpt-fast, README, Benchmarks);
* ``step_overhead_s = 0.5 ms`` per step: launch gaps, sampling and the host's part of a step
  once scheduling overlaps the GPU (SGLang v0.4 measured its overlapped scheduler as leaving
  the GPU near idle-free, https://lmsys.org/blog/2024-12-04-sglang-v0-4/; vLLM v0.6.0 found
  un-overlapped host work could take most of a Llama-3-8B/H100 step,
  https://blog.vllm.ai/2024/09/05/perf-update.html). An assumed figure within that range;
* ``gemm_efficiency = 0.70`` of peak dense fp16 FLOP/s for the projection and MLP GEMMs of a
  prompt chunk (large GEMMs on Hopper; FlashAttention-3 reaches 75% of H100 peak with the
  same tensor-core pipeline, https://arxiv.org/abs/2407.08608);
* ``attention_efficiency = 0.50`` of peak for attention FLOPs: between FlashAttention-2's 35%
  and FlashAttention-3's 75% of H100 peak in fp16 (same paper), for a paged prefill kernel.

Calibration (noise off, bias 1; :func:`calibration` prints these): Llama-3-8B fp16 on
h100-sxm decodes 1 sequence at 1k context in 6.54 ms (public figures for batch-1 decode of
an 8B model on an H100 are 6-7 ms; the planner's prior says 10.1 ms), 64 sequences at 1k
context in 9.7 ms, 32 sequences at 32k context in 58 ms (KV-bound), and prefills 1k tokens
in 25 ms (GEMM-bound: ~41k prompt tokens/s); on h200 decode 1 seq / 1k is 4.7 ms.

Noise: each step's time is multiplied by ``bias x exp(sigma x z - sigma^2 / 2)`` with ``z``
standard normal from ``numpy.random.default_rng(seed)``: the jitter has mean 1, so ``bias``
alone sets the systematic offset; a given seed gives the same sequence of factors.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scheduler.latency import (DeviceSpec, LatencyModel, ModelShape, causal_pairs,
                               prefill_attn_pairs)


@dataclass(frozen=True)
class StepWork:
    """What one model step does, in counts (floats so sums of large steps stay exact enough).

    ``prefill_tokens``: prompt tokens processed; ``prefill_attn_pairs``: their causal
    (query, key) pairs; ``prefill_context_tokens``: K/V tokens the prompt chunks' attention
    reads (context before the chunk plus the chunk); ``decode_seqs``: decode rows (one token
    each); ``decode_context_tokens``: K/V tokens the decode rows read.
    """

    prefill_tokens: float = 0.0
    prefill_attn_pairs: float = 0.0
    prefill_context_tokens: float = 0.0
    decode_seqs: float = 0.0
    decode_context_tokens: float = 0.0

    @classmethod
    def of_batch(cls, batch) -> "StepWork":
        """The work of a :class:`scheduler.loop.Batch` (its ``num_tokens``,
        ``context_lens`` and ``is_prefill`` arrays; ``context_lens`` counts this step's
        tokens)."""
        pre = np.asarray(batch.is_prefill, dtype=bool)
        t = np.asarray(batch.num_tokens, dtype=np.float64)[pre]
        ctx = np.asarray(batch.context_lens, dtype=np.float64)
        dec = ~pre
        return cls(float(t.sum()), prefill_attn_pairs(t, ctx[pre] - t),
                   float(ctx[pre].sum()), float(dec.sum()), float(ctx[dec].sum()))

    @classmethod
    def decode(cls, num_seqs: int, context_per_seq: int) -> "StepWork":
        """``num_seqs`` decode rows, each reading ``context_per_seq`` K/V tokens."""
        return cls(decode_seqs=float(num_seqs),
                   decode_context_tokens=float(num_seqs) * context_per_seq)

    @classmethod
    def prefill(cls, tokens: int, context_before: int = 0) -> "StepWork":
        """One prompt chunk of ``tokens`` after ``context_before`` cached tokens."""
        return cls(float(tokens), float(causal_pairs(tokens, context_before)),
                   float(context_before + tokens))

    def features(self) -> tuple[float, float, float, float]:
        """The planner's features (:meth:`scheduler.LatencyModel.predict_step` order)."""
        return (self.prefill_tokens, self.prefill_attn_pairs, self.decode_seqs,
                self.decode_context_tokens)


@dataclass(frozen=True)
class StepTruth:
    """Simulated step durations of ``model`` on ``device`` (see the module docstring for
    the formula and where each constant comes from).

    Efficiencies are shares of the device's nominal figures, in (0, 1];
    ``step_overhead_s`` seconds >= 0; ``bias`` > 0 multiplies every step; ``noise_sigma``
    in [0, 1] is the log-space standard deviation of the per-step jitter; ``seed`` an int
    >= 0 for the jitter's generator.
    """

    model: ModelShape
    device: DeviceSpec
    memory_efficiency: float = 0.80
    gemm_efficiency: float = 0.70
    attention_efficiency: float = 0.50
    step_overhead_s: float = 0.5e-3
    bias: float = 1.0
    noise_sigma: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelShape):
            raise TypeError(f"model must be a ModelShape, got {type(self.model).__name__}")
        if not isinstance(self.device, DeviceSpec):
            raise TypeError(f"device must be a DeviceSpec, got {type(self.device).__name__}")
        for name in ("memory_efficiency", "gemm_efficiency", "attention_efficiency"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 < v <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {v!r}")
        if not (_is_number(self.step_overhead_s) and 0 <= self.step_overhead_s < 1):
            raise ValueError(f"step_overhead_s must be in [0, 1) seconds, "
                             f"got {self.step_overhead_s!r}")
        if not (_is_number(self.bias) and 0 < self.bias <= 100):
            raise ValueError(f"bias must be in (0, 100], got {self.bias!r}")
        if not (_is_number(self.noise_sigma) and 0 <= self.noise_sigma <= 1):
            raise ValueError(f"noise_sigma must be in [0, 1], got {self.noise_sigma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) \
                or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    # ------------------------------------------------------------------ noise-free time
    def ideal_seconds(self, work: StepWork) -> float:
        """Seconds of one step doing ``work``, without bias or jitter."""
        m, d = self.model, self.device
        bw = d.hbm_bandwidth * self.memory_efficiency
        tokens = work.prefill_tokens + work.decode_seqs
        gemm = max(m.weight_bytes / bw,
                   2.0 * m.num_params * tokens / (d.fp16_flops * self.gemm_efficiency))
        kv_tokens = work.prefill_context_tokens + work.decode_context_tokens + tokens
        pairs = work.prefill_attn_pairs + work.decode_context_tokens
        attn = max(kv_tokens * m.kv_bytes_per_token / bw,
                   pairs * m.attn_flops_per_pair / (d.fp16_flops * self.attention_efficiency))
        return self.step_overhead_s + gemm + attn

    def calibration(self) -> dict[str, float]:
        """Noise-free milliseconds of reference steps (the figures quoted in the module
        docstring), as a JSON-ready dict."""
        ms = {
            "decode_step_1seq_1k_ctx_ms": StepWork.decode(1, 1024),
            "decode_step_64seq_1k_ctx_ms": StepWork.decode(64, 1024),
            "decode_step_32seq_32k_ctx_ms": StepWork.decode(32, 32 * 1024),
            "prefill_1k_tokens_ms": StepWork.prefill(1024),
            "prefill_2k_tokens_ms": StepWork.prefill(2048),
        }
        return {k: self.ideal_seconds(w) * 1e3 for k, w in ms.items()}

    def describe(self) -> dict[str, Any]:
        """The truth's parameters and calibration, JSON-ready."""
        p = {k: v for k, v in asdict(self).items() if k not in ("model", "device")}
        return {"source": "bench.step_truth.StepTruth (roofline per kernel class: GEMMs, "
                          "attention; simulated, not measured)",
                **p,
                "sources": SOURCES,
                "calibration_noise_free": self.calibration()}

    def step_fn(self, planner: LatencyModel | None = None, *,
                score_every: int = 1) -> "SimulatedStep":
        """A fresh model step for :class:`scheduler.EngineLoop` (its own generator, seeded
        with ``seed``), recording the error of ``planner``'s predictions when given (see
        :class:`SimulatedStep` for ``score_every``)."""
        return SimulatedStep(self, planner, score_every=score_every)


#: Where the constants of :class:`StepTruth` come from (also in replay.json).
SOURCES = {
    "memory_efficiency": "gpt-fast README (github.com/pytorch-labs/gpt-fast): A100-80GB "
                         "reachable HBM ~1700 of 2039 GB/s; Llama-2-7B batch-1 decode at "
                         "1397 GB/s end to end",
    "step_overhead_s": "assumed; overlapped schedulers leave ~no host gap (SGLang v0.4, "
                       "lmsys.org/blog/2024-12-04-sglang-v0-4), un-overlapped ones much more "
                       "(vLLM v0.6.0, blog.vllm.ai/2024/09/05/perf-update.html)",
    "gemm_efficiency": "assumed 70% of dense fp16 peak for large GEMMs on Hopper "
                       "(FlashAttention-3 reaches 75% of H100 peak, arxiv.org/abs/2407.08608)",
    "attention_efficiency": "between FlashAttention-2 (35%) and FlashAttention-3 (75%) of H100 "
                            "fp16 peak (arxiv.org/abs/2407.08608)",
    "decode_target": "batch-1 decode of an 8B fp16 model on an H100 takes ~6-7 ms in public "
                     "measurements (issue 9)",
}


def _is_number(v) -> bool:
    return (not isinstance(v, bool) and isinstance(v, (int, float, np.floating, np.integer))
            and math.isfinite(v))


#: Steps every :class:`SimulatedStep` scores before it samples every ``score_every``-th.
SCORED_FIRST = 32


class SimulatedStep:
    """A model step callable ``(Batch) -> seconds`` drawing from a :class:`StepTruth`, and
    the log of how far a planner's latency model was from each step it was about to see.

    The loop calls the step before it feeds the duration to its latency model, so
    ``planner.predict_step`` here is exactly the one-step-ahead prediction the planner had
    for this batch. Asking for it refits the model (a few hundred microseconds of host time
    per step on a slow CPU, where a policy that never predicts would not refit at all), so
    after the first :data:`SCORED_FIRST` steps only every ``score_every``-th step is scored.
    Scoring changes nothing the loop sees: the refit is a pure function of the observations.
    """

    def __init__(self, truth: StepTruth, planner: LatencyModel | None = None, *,
                 score_every: int = 1) -> None:
        if not isinstance(truth, StepTruth):
            raise TypeError(f"truth must be a StepTruth, got {type(truth).__name__}")
        if planner is not None and not isinstance(planner, LatencyModel):
            raise TypeError(f"planner must be a LatencyModel, got {type(planner).__name__}")
        if isinstance(score_every, bool) or not isinstance(score_every, int) or score_every < 1:
            raise ValueError(f"score_every must be an int >= 1, got {score_every!r}")
        self.truth = truth
        self.planner = planner
        self.score_every = score_every
        self.steps = 0
        self._rng = np.random.default_rng(truth.seed)
        self._shift = -0.5 * truth.noise_sigma ** 2       # mean-one jitter
        self._predicted: list[float] = []
        self._actual: list[float] = []
        self._has_prefill: list[bool] = []

    def seconds(self, work: StepWork) -> float:
        """One step doing ``work``: the noise-free time x bias x this step's jitter."""
        t = self.truth
        jitter = math.exp(t.noise_sigma * float(self._rng.standard_normal()) + self._shift) \
            if t.noise_sigma else 1.0
        return t.ideal_seconds(work) * t.bias * jitter

    def __call__(self, batch) -> float:
        work = StepWork.of_batch(batch)
        actual = self.seconds(work)
        self.steps += 1
        if self.planner is not None and (self.steps <= SCORED_FIRST
                                         or self.steps % self.score_every == 0):
            self._predicted.append(self.planner.predict_step(*work.features()))
            self._actual.append(actual)
            self._has_prefill.append(work.prefill_tokens > 0)
        return actual

    def prediction_error(self) -> dict[str, Any]:
        """How the planner's one-step-ahead predictions compared with the simulated truth,
        JSON-ready: ``steps`` (scored; ``steps_run``: all); ``mape_pct`` (mean of
        ``|pred - true| / true``, in %), ``bias_pct`` (mean of ``(pred - true) / true``:
        > 0 means the planner over-predicts), ``abs_pct_p50`` / ``abs_pct_p99``; the same
        MAPE over decode-only
        steps and over steps carrying prompt tokens; and over the first :data:`SCORED_FIRST`
        steps (cold model, mostly the prior). Values are None where there are no steps."""
        pred = np.asarray(self._predicted, dtype=np.float64)
        true = np.asarray(self._actual, dtype=np.float64)
        pre = np.asarray(self._has_prefill, dtype=bool)
        rel = np.divide(pred - true, true, out=np.zeros_like(true), where=true > 0) * 100

        def mape(sel) -> float | None:
            return float(np.abs(rel[sel]).mean()) if rel[sel].size else None

        every = np.ones(rel.size, dtype=bool)
        first = np.zeros(rel.size, dtype=bool)
        first[:SCORED_FIRST] = True
        return {"steps": int(rel.size), "steps_run": self.steps,
                "score_every": self.score_every,
                "mape_pct": mape(every),
                "bias_pct": float(rel.mean()) if rel.size else None,
                "abs_pct_p50": float(np.percentile(np.abs(rel), 50)) if rel.size else None,
                "abs_pct_p99": float(np.percentile(np.abs(rel), 99)) if rel.size else None,
                "mape_decode_only_pct": mape(~pre),
                "mape_with_prefill_pct": mape(pre),
                "mape_first_32_steps_pct": mape(first)}
