"""Shared builders for the arena tests: a tiny KV geometry and a snapshot of arena state."""
from __future__ import annotations

import numpy as np
import torch

from arena import KVSpec, PagedArena

PAGE = 4096


def tiny_spec(**kw) -> KVSpec:
    """A 256-byte block: 1 layer, K+V, 4 tokens, 1 head, head_dim 8, float32."""
    args = dict(num_layers=1, num_kv_heads=1, head_dim=8, block_size=4, dtype=torch.float32)
    args.update(kw)
    return KVSpec(**args)


def tiny_arena(chunks: int = 8, limit_chunks: int | None = None, **kw) -> PagedArena:
    """An arena of ``chunks`` 4 KiB chunks (16 blocks each) on the host backend."""
    spec = kw.pop("spec", None) or tiny_spec()
    limit = None if limit_chunks is None else limit_chunks * PAGE
    return PagedArena(spec, chunks * PAGE, "cpu", granularity=PAGE, device_limit_bytes=limit,
                      max_seqs=kw.pop("max_seqs", 16), **kw)


def snapshot(arena: PagedArena) -> dict:
    """Everything a failed call must leave untouched."""
    s = arena.stats()
    for key in ("time_map_s", "time_unmap_s", "time_compact_s"):
        s.pop(key)
    return dict(stats=s, owner=arena._owner.copy(), chunks=arena._chunk_mapped.copy(),
                tables=arena.tables.host.copy(),
                pools={n: p.owned().tolist() for n, p in arena.pools.items()})


def assert_same(a: dict, b: dict) -> None:
    assert a["stats"] == b["stats"]
    np.testing.assert_array_equal(a["owner"], b["owner"])
    np.testing.assert_array_equal(a["chunks"], b["chunks"])
    np.testing.assert_array_equal(a["tables"], b["tables"])
    assert a["pools"] == b["pools"]


def check_invariants(arena: PagedArena) -> None:
    """The arena's bookkeeping agrees with itself (see the module docstring of
    arena.paged_arena): ownership counts, leases, mapping, and the chunk-0 rule."""
    with arena.lock:
        owner = arena._owner
        pools = arena.pools
        for p in pools.values():
            n = int((owner == p.index).sum())
            assert n == p.num_owned >= 0, (p, n)
            assert p.num_owned <= p.lease, p
        assert arena.used_blocks == int((owner != -1).sum())
        assert arena.leased_blocks == sum(p.lease for p in pools.values()) <= arena.mapped_blocks
        mapped = arena._chunk_mapped
        assert arena.mapped_bytes == int(mapped.sum()) * arena.chunk_bytes
        assert arena.backend.mapped_bytes == arena.mapped_bytes
        live_chunks = np.unique(np.flatnonzero(owner != -1) // arena.blocks_per_chunk)
        assert mapped[live_chunks].all(), "an owned block lies in an unmapped chunk"
        assert mapped[0] or not mapped.any(), "chunk 0 unmapped while other chunks are mapped"
        for c in range(arena.num_chunks):
            assert arena.backend.is_mapped(c * arena.chunk_bytes) == bool(mapped[c])
