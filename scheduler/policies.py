"""Preemption policies: which decode requests give their memory back, and how.

A *victim order* is a callable ``(decode_set, remaining) -> int64 [n]``: the indices of
``decode_set`` (a :class:`~scheduler.request.RequestSet`) in the order they are preempted,
first victim first; ``remaining`` is the predicted remaining tokens (int64 ``[n]``).

A *preemption mode* decides, per victim, whether its KV blocks are swapped to host memory
(resumed later byte for byte) or dropped and recomputed by a new prefill.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .latency import LatencyModel, causal_pairs
from .registry import Registry
from .request import RequestSet

VictimOrder = Callable[[RequestSet, np.ndarray], np.ndarray]


def most_recent_first(s: RequestSet, remaining: np.ndarray) -> np.ndarray:
    """Most recently (first) admitted first: the oldest requests keep making progress."""
    return np.argsort(-s.admit_seq, kind="stable")


def most_blocks_first(s: RequestSet, remaining: np.ndarray) -> np.ndarray:
    """Largest holders first: fewest preemptions to free a given number of blocks."""
    return np.argsort(-s.blocks, kind="stable")


def longest_remaining_first(s: RequestSet, remaining: np.ndarray) -> np.ndarray:
    """Longest predicted remaining output first: those would hold memory longest."""
    return np.argsort(-np.asarray(remaining), kind="stable")


VICTIM_POLICIES: dict[str, VictimOrder] = {
    "most-recent": most_recent_first,
    "most-blocks": most_blocks_first,
    "longest-remaining": longest_remaining_first,
}

#: Victim orders by name; a callable ``(decode_set, remaining) -> order`` is accepted as is.
VICTIM_ORDERS: Registry[VictimOrder] = Registry(
    "victim policy", {name: (lambda f=f: f) for name, f in VICTIM_POLICIES.items()},
    accepts=callable)


def victim_order(spec: str | VictimOrder) -> VictimOrder:
    """A victim order from a name in :data:`VICTIM_ORDERS` or a callable."""
    return VICTIM_ORDERS.resolve(spec)


class PreemptionMode:
    """Swap or recompute, per victim.

    ``mode``: ``"swap"`` always swaps, ``"recompute"`` always drops, ``"auto"`` swaps when
    moving the blocks out and back over the host link (``2 * bytes / host_bandwidth``)
    is predicted cheaper than re-prefilling the request's tokens with the latency model.
    ``host_bandwidth`` in bytes/s (PCIe 5 x16 is about 25e9 in practice).
    """

    MODES = ("auto", "swap", "recompute")

    def __init__(self, mode: str = "auto", *, host_bandwidth: float = 25e9) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not host_bandwidth > 0:
            raise ValueError(f"host_bandwidth must be > 0, got {host_bandwidth!r}")
        self.mode = mode
        self.host_bandwidth = float(host_bandwidth)

    def __call__(self, kv_len: np.ndarray, blocks: np.ndarray, block_bytes: int,
                 latency: LatencyModel | None) -> np.ndarray:
        """Bool ``[n]``: True = swap, False = recompute, for victims with ``kv_len`` tokens
        (int64 ``[n]``) in ``blocks`` blocks (int64 ``[n]``) of ``block_bytes`` bytes."""
        n = kv_len.shape[0]
        if self.mode == "swap":
            return np.ones(n, dtype=bool)
        if self.mode == "recompute" or latency is None:
            return np.zeros(n, dtype=bool) if self.mode == "recompute" else np.ones(n, bool)
        c = latency.coef
        kv = kv_len.astype(np.float64)
        recompute_s = c[1] * kv + c[2] * causal_pairs(kv, 0.0)
        swap_s = 2.0 * blocks.astype(np.float64) * block_bytes / self.host_bandwidth
        return swap_s < recompute_s


#: Preemption modes by name (keyword ``host_bandwidth`` passed on); a
#: :class:`PreemptionMode` or any callable of its signature is accepted as is.
PREEMPTION_MODES: Registry[PreemptionMode] = Registry(
    "preemption", {m: (lambda m=m, **kw: PreemptionMode(m, **kw)) for m in PreemptionMode.MODES},
    accepts=callable)
