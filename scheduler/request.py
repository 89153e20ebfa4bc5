"""Request state, and its plain-data (array) form used by the planner.

Token accounting (the same for every memory policy):

* ``kv_len`` — tokens whose K/V are written in the cache.
* ``prefill_len`` — tokens the prefill phase writes before the next token comes out: the
  prompt; after a preemption by recompute, the prompt plus every token generated so far.
* ``generated`` — output tokens produced. The step that completes a prefill produces one;
  every decode step writes the K/V of the last token and produces one more, so while
  decoding ``kv_len == prompt_tokens + generated - 1``.
* A request finishes when ``generated == target`` where ``target = min(output_tokens,
  max_tokens)``. ``output_tokens`` is the trace's truth: only the loop's finish check and
  the oracle predictor read it.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np


class Phase(enum.IntEnum):
    """Where a request is in its life."""

    PENDING = 0     # submitted, arrival time not reached
    WAITING = 1     # arrived (or preempted by recompute), not admitted
    PREFILL = 2     # admitted, prompt being processed
    DECODE = 3      # generating
    SWAPPED = 4     # preempted, KV bytes on the host, waiting to come back
    FINISHED = 5


@dataclass(eq=False)
class Request:
    """One request and its mutable state. ``req_id`` is a non-negative int, unique."""

    req_id: int
    prompt_tokens: int
    max_tokens: int
    output_tokens: int
    arrival_s: float = 0.0
    # ---- state, owned by the loop
    phase: Phase = Phase.PENDING
    kv_len: int = 0
    prefill_len: int = 0
    generated: int = 0
    num_blocks: int = 0
    admit_seq: int = -1
    pool: str = ""
    num_preemptions: int = 0
    swap_data: Any = None
    admit_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("req_id", "prompt_tokens", "max_tokens", "output_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.req_id < 0:
            raise ValueError(f"req_id must be >= 0, got {self.req_id}")
        if self.prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")
        if not math.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise ValueError(f"arrival_s must be finite and >= 0, got {self.arrival_s}")
        self.req_id = int(self.req_id)
        if self.prefill_len == 0:
            self.prefill_len = int(self.prompt_tokens)

    @property
    def target(self) -> int:
        """Output tokens this request generates in all: ``min(output_tokens, max_tokens)``."""
        return min(self.output_tokens, self.max_tokens)

    @property
    def final_kv_len(self) -> int:
        """K/V tokens in the cache just before it finishes: prompt + target - 1."""
        return self.prompt_tokens + self.target - 1


@dataclass
class RequestSet:
    """A set of requests as parallel int64 arrays, the planner's input.

    Fields (each ``int64 [n]``): ``ids``; ``kv_len`` (tokens with K/V written);
    ``prefill_len`` (tokens to write before the next token comes out);
    ``generated``; ``max_tokens``; ``blocks`` (blocks held now); ``admit_seq`` (order of first
    admission, larger = more recent; -1 if never admitted); and ``swapped`` (bool ``[n]``:
    the request resumes by swap-in, straight into decode).
    """

    ids: np.ndarray
    kv_len: np.ndarray
    prefill_len: np.ndarray
    generated: np.ndarray
    max_tokens: np.ndarray
    blocks: np.ndarray
    admit_seq: np.ndarray
    swapped: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def empty(cls) -> "RequestSet":
        """A set of no requests."""
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z, z, z, z, z, z, np.zeros(0, dtype=bool))

    @classmethod
    def from_arrays(cls, *, ids: Sequence[int], kv_len: Sequence[int],
                    prefill_len: Sequence[int] | None = None,
                    generated: Sequence[int] | None = None,
                    max_tokens: Sequence[int] | None = None,
                    blocks: Sequence[int] | None = None,
                    admit_seq: Sequence[int] | None = None,
                    swapped: Sequence[bool] | None = None,
                    block_size: int | None = None) -> "RequestSet":
        """Build a set from sequences, checking lengths and signs.

        Defaults: ``prefill_len = kv_len``, ``generated = 0``, ``max_tokens`` large
        (2**31 - 1), ``blocks = ceil(kv_len / block_size)`` (``block_size`` then required),
        ``admit_seq = arange(n)``, ``swapped = False``.
        """
        ids_a = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = ids_a.shape[0]

        def arr(name, v, default):
            a = np.asarray(default if v is None else v, dtype=np.int64).reshape(-1)
            if a.shape[0] != n:
                raise ValueError(f"{name} has {a.shape[0]} entries, ids has {n}")
            if np.any(a < (-1 if name == "admit_seq" else 0)):
                raise ValueError(f"{name} must be non-negative")
            return a

        kv = arr("kv_len", kv_len, None)
        if blocks is None:
            if block_size is None:
                raise ValueError("block_size is required when blocks is not given")
            blocks = -(-kv // int(block_size))
        sw = np.zeros(n, dtype=bool) if swapped is None else np.asarray(swapped, dtype=bool)
        if sw.shape != (n,):
            raise ValueError(f"swapped has shape {sw.shape}, expected ({n},)")
        return cls(ids_a, kv,
                   arr("prefill_len", prefill_len, kv),
                   arr("generated", generated, np.zeros(n, np.int64)),
                   arr("max_tokens", max_tokens, np.full(n, 2**31 - 1, np.int64)),
                   arr("blocks", blocks, None),
                   arr("admit_seq", admit_seq, np.arange(n, dtype=np.int64)),
                   sw)

    @classmethod
    def from_requests(cls, reqs: Iterable[Request]) -> "RequestSet":
        """Snapshot the state of ``reqs`` (in iteration order)."""
        reqs = list(reqs)
        n = len(reqs)
        if n == 0:
            return cls.empty()
        m = np.fromiter((v for r in reqs for v in (r.req_id, r.kv_len, r.prefill_len,
                                                   r.generated, r.max_tokens, r.num_blocks,
                                                   r.admit_seq, r.phase == Phase.SWAPPED)),
                        dtype=np.int64, count=8 * n).reshape(n, 8).T
        return cls(m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7].astype(bool))
