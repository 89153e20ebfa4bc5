"""A synthetic model step that writes real, checkable K/V (a test and benchmark helper).

:class:`SyntheticKVModel` is a model step for :class:`~scheduler.loop.EngineLoop`: for every
token of a batch and every layer it writes K and V with ``kernels.write_kv`` into
``arena.kv_cache(layer)``, the values a function of (request id, token position, layer,
head, dim). A token's K/V therefore do not depend on when, in which batch or in which
block they were written, so a test can check that a request's cache is byte-identical to
what it should be after a swap-out and swap-in, after a recompute, and after compactions.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

import kernels
from kernels.reference import gather_context

from .loop import Batch


class SyntheticKVModel:
    """Writes deterministic K/V for each batch; returns a duration.

    Args:
        arena: the :class:`arena.PagedArena` the loop runs on.
        duration_s: seconds per step (a float), or a callable ``(Batch) -> seconds``
            (e.g. :func:`scheduler.loop.latency_step`).
    """

    def __init__(self, arena, duration_s: float | Callable[[Batch], float] = 1e-3) -> None:
        self.arena = arena
        self.spec = arena.spec
        if not callable(duration_s) and not (float(duration_s) >= 0):
            raise ValueError(f"duration_s must be >= 0 or callable, got {duration_s!r}")
        self.duration_s = duration_s
        h, d = self.spec.num_kv_heads, self.spec.head_dim
        self._hd = (torch.arange(h).view(1, h, 1) * 7 + torch.arange(d).view(1, 1, d) * 3)
        self.tokens_written = 0

    def kv_values(self, req_ids: torch.Tensor, positions: torch.Tensor,
                  layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[T, num_kv_heads, head_dim]`` in the arena's dtype for tokens given by
        int64 ``req_ids`` and ``positions`` ``[T]`` in ``layer``: multiples of 1/64 in
        [-8, 8), exact in fp16, bf16 and fp32."""
        base = (req_ids * 131 + positions * 31 + layer * 17).view(-1, 1, 1) + self._hd
        k = (base % 509).to(torch.float32) / 32 - 8
        v = ((base + 5) % 509).to(torch.float32) / 32 - 8
        return k.to(self.spec.dtype), v.to(self.spec.dtype)

    def __call__(self, batch: Batch) -> float:
        """Write the batch's K/V for every layer; return the step's duration (seconds)."""
        rid = torch.from_numpy(np.repeat(batch.req_ids, batch.num_tokens))
        pos = torch.from_numpy(batch.positions)
        slots = torch.from_numpy(batch.slot_mapping).to(self.arena.device)
        for layer in range(self.spec.num_layers):
            k, v = self.kv_values(rid, pos, layer)
            kernels.write_kv(self.arena.kv_cache(layer), k.to(self.arena.device),
                             v.to(self.arena.device), slots)
        self.tokens_written += int(slots.shape[0])
        if callable(self.duration_s):
            return float(self.duration_s(batch))
        return float(self.duration_s)

    def expected(self, req_id: int, num_tokens: int, layer: int):
        """The K and V ``[num_tokens, num_kv_heads, head_dim]`` request ``req_id`` should
        have in ``layer`` for its first ``num_tokens`` tokens."""
        pos = torch.arange(num_tokens, dtype=torch.int64)
        rid = torch.full((num_tokens,), int(req_id), dtype=torch.int64)
        return self.kv_values(rid, pos, layer)

    def cached(self, req_id: int, num_tokens: int, layer: int):
        """The K and V the arena holds now for request ``req_id``'s first ``num_tokens``
        tokens in ``layer`` (read through its block table)."""
        row = torch.from_numpy(self.arena.tables.blocks(req_id)).to(self.arena.device)
        return gather_context(self.arena.kv_cache(layer), row, num_tokens)

    def mismatches(self, req_id: int, num_tokens: int) -> int:
        """Layers in which the cached K/V of ``req_id``'s first ``num_tokens`` tokens differ
        (bit for bit) from what they should be; 0 means byte-identical."""
        bad = 0
        for layer in range(self.spec.num_layers):
            k, v = self.cached(req_id, num_tokens, layer)
            ek, ev = self.expected(req_id, num_tokens, layer)
            if not (torch.equal(k.cpu().view(torch.int16 if k.element_size() == 2 else
                                             torch.int32),
                                ek.view(torch.int16 if ek.element_size() == 2 else torch.int32))
                    and torch.equal(v.cpu().view(torch.int16 if v.element_size() == 2 else
                                                 torch.int32),
                                    ev.view(torch.int16 if ev.element_size() == 2 else
                                            torch.int32))):
                bad += 1
        return bad
