"""Processing-duration model: how long a model step takes, fitted online.

One linear model covers prefill, decode and mixed (chunked-prefill) steps, because a step
that carries both pays the weight read once:

    duration = c0                          fixed cost of a step (weights read, launches)
             + c1 * prefill_tokens         projection / MLP FLOPs of prompt tokens
             + c2 * prefill_attn_pairs     attention (query token x context token) pairs
             + c3 * decode_seqs            per-sequence decode cost
             + c4 * decode_context_tokens  KV bytes read by decode attention

:meth:`LatencyModel.observe` adds a measured step; the coefficients are refitted lazily by
least squares over a sliding window of recent steps, regularised towards a prior (ridge
towards the prior coefficients, each feature scaled by its typical size) and constrained to
non-negative coefficients, so a cold model predicts the prior and a warm one follows the
data. Being linear, it cannot follow a device whose step time is a roofline maximum (the
weight read hides under the GEMMs of a long prompt chunk): its error on such steps is the
price of a model cheap enough to query many times per plan. The prior is given as numbers or derived
by :meth:`LatencyModel.from_hardware` from a :class:`ModelShape` and a :class:`DeviceSpec`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

NUM_FEATURES = 5
FEATURE_NAMES = ("step", "prefill_tokens", "prefill_attn_pairs", "decode_seqs",
                 "decode_context_tokens")


@dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer, as far as memory and time are concerned.

    ``num_params`` counts all weights; ``dtype_bytes`` is the size of one weight / KV element
    (2 for fp16/bf16).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_params: float
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "dtype_bytes"):
            v = getattr(self, field)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{field} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not self.num_params > 0:
            raise ValueError(f"num_params must be > 0, got {self.num_params!r}")

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights (read once per step)."""
        return float(self.num_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's K and V over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> float:
        """FLOPs of one (query token, context token) pair over all layers: QK^T and PV,
        2 FLOPs per multiply-add each, over every query head."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim

    def kv_spec(self, block_size: int = 16, dtype=None):
        """An :class:`arena.KVSpec` for this model's KV cache.

        ``dtype`` defaults to float16 when ``dtype_bytes == 2``, float32 when 4.
        """
        import torch

        from arena import KVSpec

        if dtype is None:
            dtype = {2: torch.float16, 4: torch.float32}.get(
                self.dtype_bytes)
            if dtype is None:
                raise ValueError(f"no default dtype for dtype_bytes={self.dtype_bytes}")
        return KVSpec(self.num_layers, self.num_kv_heads, self.head_dim,
                      block_size=block_size, dtype=dtype)


@dataclass(frozen=True)
class DeviceSpec:
    """An accelerator: memory in bytes, HBM bandwidth in bytes/s, dense fp16 FLOP/s."""

    name: str
    memory_bytes: int
    hbm_bandwidth: float
    fp16_flops: float

    def __post_init__(self) -> None:
        for field in ("memory_bytes", "hbm_bandwidth", "fp16_flops"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)!r}")


GiB = 1 << 30

#: Model presets (public configs; parameter counts include embeddings).
MODELS: dict[str, ModelShape] = {
    "llama-3-8b": ModelShape("llama-3-8b", 32, 4096, 32, 8, 128, 8.03e9),
    "llama-3-70b": ModelShape("llama-3-70b", 80, 8192, 64, 8, 128, 70.6e9),
    "llama-2-7b": ModelShape("llama-2-7b", 32, 4096, 32, 32, 128, 6.74e9),
    "mistral-7b": ModelShape("mistral-7b", 32, 4096, 32, 8, 128, 7.24e9),
    "qwen2.5-7b": ModelShape("qwen2.5-7b", 28, 3584, 28, 4, 128, 7.62e9),
}

#: Device presets: nominal memory (GiB), HBM bandwidth and dense fp16/bf16 tensor FLOP/s.
DEVICES: dict[str, DeviceSpec] = {
    "h100-sxm": DeviceSpec("h100-sxm", 80 * GiB, 3.35e12, 989e12),
    "h200": DeviceSpec("h200", 141 * GiB, 4.8e12, 989e12),
    "a100-80g": DeviceSpec("a100-80g", 80 * GiB, 2.039e12, 312e12),
    "l40s": DeviceSpec("l40s", 48 * GiB, 0.864e12, 362e12),
}


def causal_pairs(num_tokens, context_before):
    """Causal (query, key) pairs of ``num_tokens`` new tokens after ``context_before``
    cached ones: query j sees ``context_before + j + 1`` keys, so the pairs are
    ``num_tokens * (context_before + (num_tokens + 1) / 2)``. The one definition of the
    formula: ints or numpy arrays (elementwise), returns float / float64."""
    return num_tokens * (context_before + 0.5 * (num_tokens + 1))


def prefill_attn_pairs(num_tokens: np.ndarray, context_before: np.ndarray) -> float:
    """Sum over sequences of the causal (query, key) pairs of a prefill chunk.

    ``num_tokens[i]`` new tokens follow ``context_before[i]`` tokens already in the cache;
    query j of the chunk sees ``context_before + j + 1`` keys. Arrays of any int dtype, same
    shape; returns a float: the sum of :func:`causal_pairs`, computed with two dot products
    (no temporary per sequence).
    """
    t = np.asarray(num_tokens, dtype=np.float64)
    c = np.asarray(context_before, dtype=np.float64)
    return float(np.dot(t, c) + 0.5 * np.dot(t, t + 1.0))


def nonnegative_least_squares(gram: np.ndarray, rhs: np.ndarray, *, exact: bool = True,
                               guess: np.ndarray | None = None) -> np.ndarray:
    """``argmin ||a x - b||^2`` over ``x >= 0``, given ``gram = a^T a`` and ``rhs = a^T b``
    (Lawson and Hanson's active-set method on the normal equations).

    ``gram``: float64 ``[n, n]``, symmetric positive semi-definite; ``rhs``: ``[n]``. With
    ``exact`` (``gram`` known positive definite, e.g. ridge-regularised) each subproblem is a
    Cholesky-free ``solve``; otherwise a least-squares solve (minimum norm). Returns float64
    ``[n]``; the unconstrained solution as is when it has no negative entry. ``guess``: a
    bool ``[n]`` mask of the entries expected positive (the last solution's, when the data
    changed little); when it is right (the optimality conditions hold) one solve suffices."""
    def solve(idx: np.ndarray) -> np.ndarray:
        g, h = gram[np.ix_(idx, idx)], rhs[idx]
        return np.linalg.solve(g, h) if exact else np.linalg.lstsq(g, h, rcond=None)[0]

    n = rhs.shape[0]
    every = np.arange(n)
    tol = 1e-12 * max(1.0, float(np.abs(rhs).max()))
    if guess is not None and guess.any() and not guess.all():
        x = np.zeros(n)
        x[guess] = solve(every[guess])
        # optimal iff positive where free and no zeroed entry's gradient points inwards
        if np.all(x[guess] > 0) and np.all((rhs - gram @ x)[~guess] <= tol):
            return x
    x = solve(every)
    if np.all(x >= 0):
        return x
    passive = np.zeros(n, dtype=bool)
    x = np.zeros(n)
    for _ in range(3 * n):                        # each pass adds one variable
        grad = rhs - gram @ x                     # minus the gradient of the objective
        grad[passive] = -np.inf
        j = int(np.argmax(grad))
        if passive.all() or grad[j] <= tol:
            break
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = solve(every[passive])
            if np.all(z[passive] > 0):
                x = z
                break
            # step from x towards z until the first passive entry reaches zero; drop it
            hit = passive & (z <= 0)
            alpha = float(np.min(x[hit] / (x[hit] - z[hit])))
            x = x + alpha * (z - x)
            passive &= x > 0
            x[~passive] = 0.0
    return x


class LatencyModel:
    """Predicts step durations (seconds) from work counts; refitted online.

    Parameters
    ----------
    prior : five coefficients ``(c0..c4)`` in seconds per unit of each feature
        (see the module docstring), used alone until data arrives.
    window : number of most recent steps the least-squares fit uses.
    prior_weight : how many typical observations the prior is worth (ridge strength).
    """

    def __init__(self, prior: Sequence[float], *, window: int = 256,
                 prior_weight: float = 4.0) -> None:
        p = np.asarray(prior, dtype=np.float64)
        if p.shape != (NUM_FEATURES,) or not np.all(np.isfinite(p)) or np.any(p < 0):
            raise ValueError(f"prior must be {NUM_FEATURES} finite non-negative numbers, "
                             f"got {prior!r}")
        if not isinstance(window, int) or window < NUM_FEATURES:
            raise ValueError(f"window must be an int >= {NUM_FEATURES}, got {window!r}")
        if not prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight!r}")
        self.prior = p
        self.window = window
        self.prior_weight = float(prior_weight)
        self._x = np.zeros((window, NUM_FEATURES))
        self._y = np.zeros(window)
        self._n = 0          # observations seen in total
        self._dirty = False
        self._coef = p.copy()
        self._c = tuple(float(v) for v in p)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hardware(cls, model: ModelShape, device: DeviceSpec, *, efficiency: float = 0.6,
                      step_overhead_s: float = 2e-3, **kwargs) -> "LatencyModel":
        """A cold-start prior from a roofline of ``model`` on ``device``.

        Decode step ~ (weight bytes + KV bytes read) / (bandwidth * efficiency) plus a fixed
        overhead plus 2 * params FLOPs per sequence; prefill ~ (2 * params * tokens +
        attention FLOPs) / (FLOP/s * efficiency). ``efficiency`` in (0, 1] is the fraction
        of peak reached; ``step_overhead_s`` the fixed launch/scheduling cost of a step.
        Extra keyword arguments go to the constructor (window, prior_weight).

        A deliberately pessimistic cold start: memory and compute times add (no roofline
        max) and the defaults are conservative, so Llama-3-8B decoding one sequence at 1k
        context on an h100-sxm is predicted at 10.1 ms, where public measurements give
        6-7 ms (``bench.step_truth``, the host replay's simulated GPU, gives 6.5 ms). An
        engine starting from it admits cautiously until the online fit (tens of steps)
        replaces it with what the device really does.
        """
        if not isinstance(model, ModelShape):
            raise TypeError(f"model must be a ModelShape, got {type(model).__name__}")
        if not isinstance(device, DeviceSpec):
            raise TypeError(f"device must be a DeviceSpec, got {type(device).__name__}")
        if not 0 < efficiency <= 1:
            raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
        if not step_overhead_s >= 0:
            raise ValueError(f"step_overhead_s must be >= 0, got {step_overhead_s!r}")
        bw = device.hbm_bandwidth * efficiency
        flops = device.fp16_flops * efficiency
        prior = (
            model.weight_bytes / bw + step_overhead_s,
            2.0 * model.num_params / flops,
            model.attn_flops_per_pair / flops,
            2.0 * model.num_params / flops,
            model.kv_bytes_per_token / bw,
        )
        return cls(prior, **kwargs)

    # ------------------------------------------------------------------ prediction
    @property
    def coef(self) -> np.ndarray:
        """The five coefficients now in use (float64 ``[5]``, seconds per unit)."""
        self._refit()
        return self._coef.copy()

    @property
    def c(self) -> tuple[float, float, float, float, float]:
        """The coefficients now in use as a tuple of Python floats (cheap, no copy)."""
        self._refit()
        return self._c

    @property
    def num_observations(self) -> int:
        """Steps observed so far (the fit uses the last ``window`` of them)."""
        return self._n

    def predict_step(self, prefill_tokens: float = 0.0, prefill_attn: float = 0.0,
                     decode_seqs: float = 0.0, decode_context: float = 0.0) -> float:
        """Seconds for one step carrying that work (see the module docstring)."""
        self._refit()
        c0, c1, c2, c3, c4 = self._c
        return (c0 + c1 * prefill_tokens + c2 * prefill_attn + c3 * decode_seqs
                + c4 * decode_context)

    def prefill_time(self, tokens: float, attn_pairs: float) -> float:
        """Seconds to prefill ``tokens`` prompt tokens with ``attn_pairs`` attention pairs in
        one step (see :func:`prefill_attn_pairs`)."""
        return self.predict_step(tokens, attn_pairs, 0.0, 0.0)

    def decode_time(self, num_seqs: float, context_tokens: float) -> float:
        """Seconds for one decode step of ``num_seqs`` sequences reading ``context_tokens``
        cached tokens in total."""
        return self.predict_step(0.0, 0.0, num_seqs, context_tokens)

    # ------------------------------------------------------------------ fitting
    def observe(self, prefill_tokens: float, prefill_attn: float, decode_seqs: float,
                decode_context: float, duration_s: float) -> None:
        """Record one measured step: its work counts and its duration in seconds."""
        if not (math.isfinite(duration_s) and duration_s >= 0):
            raise ValueError(f"duration_s must be finite and >= 0, got {duration_s!r}")
        i = self._n % self.window
        self._x[i] = (1.0, prefill_tokens, prefill_attn, decode_seqs, decode_context)
        self._y[i] = duration_s
        self._n += 1
        self._dirty = True

    def _refit(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        n = min(self._n, self.window)
        x, y = self._x[:n], self._y[:n]
        # Feature scales make the ridge term comparable across features whose magnitudes
        # differ by many orders (1 vs millions of attention pairs).
        scale = np.maximum(np.abs(x).mean(axis=0), 1.0)
        # Ridge towards the prior in scaled coordinates (w' = w * scale): minimise
        # ||(x / scale) w' - y||^2 + lambda ||w' - prior * scale||^2. Its normal equations
        # are 5 x 5; scaling puts every column near 1 and the ridge adds lambda to every
        # eigenvalue, so they are well conditioned (a plain least-squares solve when
        # lambda = 0).
        xs = x / scale
        lam = self.prior_weight
        gram = xs.T @ xs + lam * np.eye(NUM_FEATURES)
        rhs = xs.T @ y + lam * self.prior * scale
        # Work never makes a step faster, so the coefficients are constrained to be >= 0.
        # Clipping an unconstrained solution instead leaves the others fitted around a
        # negative slope: when steps whose weight read hides under GEMM time pull a slope
        # below zero, the clipped model over-predicts every step (by ~9% on the replay's
        # decode steps).
        coef = nonnegative_least_squares(gram, rhs, exact=lam > 0,
                                         guess=self._coef > 0) / scale
        self._coef = coef
        self._c = tuple(float(v) for v in coef)
