"""Soak: a long run of random valid operations against a plain model of the arena.

The model (numpy arrays: block owner, block content tag, chunk mapped, leases, sequences)
predicts every result independently — which blocks an allocation returns, whether a resize
runs out of memory, the exact moves of a shrink, how many chunks a release returns — and
after every operation the arena must agree, down to the contents of every live block
(through compactions and swap round trips).

Length: ``ARENA_SOAK_OPS`` operations, default 100,000 when ``CI=true`` and 10,000 otherwise.
Compaction uses the torch reference for speed, and the Triton kernel (interpreted on CPU) for
one shrink in ``KERNEL_EVERY``; the hypothesis machine in test_arena_properties.py runs the
kernel on every shrink. The multi-threaded variant is test_arena_threads.py.
"""
import os
import random
import time

import numpy as np
import pytest
import torch

from arena import ArenaOutOfMemory, BlockTables
from kernels import compact_blocks
from kernels.reference import compact_blocks_ref
from tests.arena_helpers import check_invariants, tiny_arena

OPS = int(os.environ.get("ARENA_SOAK_OPS",
                         100_000 if os.environ.get("CI", "").lower() == "true" else 10_000))
KERNEL_EVERY = 10
FREE = -1
POOLS = ("prefill", "decode", "swap")


def same(got, want) -> None:
    """Array equality, fast (numpy.testing's helpers cost ~200 us a call)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and np.array_equal(got, want), (got, want)


class Compactor:
    """The reference compaction, with the Triton kernel every ``KERNEL_EVERY``-th call."""

    def __init__(self):
        self.calls = 0
        self.kernel_calls = 0

    def __call__(self, blocks, src, dst, table):
        self.calls += 1
        if self.calls % KERNEL_EVERY == 0:
            self.kernel_calls += 1
            return compact_blocks(blocks, src, dst, table)
        return compact_blocks_ref(blocks, src, dst, table)


class Soak:
    def __init__(self, seed: int, *, limit_chunks, separate_mirror: bool):
        self.rng = random.Random(seed)
        self.compactor = Compactor()
        a = self.arena = tiny_arena(chunks=8, limit_chunks=limit_chunks, max_seqs=12,
                                    compact_fn=self.compactor)
        if separate_mirror:  # the GPU path: device table apart from the host mirror
            a.tables = BlockTables(12, a.capacity_blocks, a.device, num_blocks=a.capacity_blocks,
                                   separate_mirror=True, guard=a._guard)
        self.pools = [a.pool(name) for name in POOLS]
        self.bpc, self.n = a.blocks_per_chunk, a.capacity_blocks
        self.limit = None if limit_chunks is None else limit_chunks
        self.owner = np.full(self.n, FREE, np.int16)
        self.tag = np.zeros(self.n, np.float32)
        self.mapped = np.zeros(a.num_chunks, bool)
        self.lease = [0] * len(POOLS)
        self.seqs: dict[int, np.ndarray] = {}
        self.swapped: list[tuple[torch.Tensor, np.ndarray]] = []
        self.next_tag = 1.0
        self.next_seq = 0
        self.content = a.blocks.view(self.n, -1).numpy()  # same memory, for fast checks
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------------ model helpers
    def owned(self, p):
        return np.flatnonzero(self.owner == p)

    def in_seq(self):
        return np.concatenate(list(self.seqs.values())) if self.seqs else np.empty(0, np.int64)

    def loose(self, p):
        """Blocks of pool p that no sequence lists (free to free or transfer)."""
        return np.setdiff1d(self.owned(p), self.in_seq())

    def write(self, ids):
        tags = self.next_tag + np.arange(ids.size, dtype=np.float32)
        self.next_tag += ids.size
        self.tag[ids] = tags
        self.content[ids] = tags[:, None]

    # ------------------------------------------------------------------ operations
    def op_resize(self):
        p = self.rng.randrange(len(POOLS))
        target = (self.owner == p).sum() + self.rng.randint(0, 48)
        new_leased = sum(self.lease) - self.lease[p] + target
        short = new_leased - self.mapped.sum() * self.bpc
        need = max(0, -(-short // self.bpc))
        fits = (new_leased <= self.n and need <= (~self.mapped).sum()
                and (self.limit is None or self.mapped.sum() + need <= self.limit))
        try:
            self.pools[p].resize(int(target))
        except ArenaOutOfMemory:
            assert not fits
            return
        assert fits
        self.mapped[np.flatnonzero(~self.mapped)[:need]] = True
        self.lease[p] = int(target)

    def op_allocate(self):
        p = self.rng.randrange(len(POOLS))
        n = min(self.rng.randint(0, 24), self.lease[p] - (self.owner == p).sum())
        free = np.flatnonzero(np.repeat(self.mapped, self.bpc) & (self.owner == FREE))
        ids = self.pools[p].allocate(int(n))
        same(ids, free[:n])  # the lowest free mapped blocks
        self.owner[ids] = p
        self.write(ids)

    def op_free(self):
        p = self.rng.randrange(len(POOLS))
        cand = self.loose(p)
        ids = np.array(self.rng.sample(cand.tolist(), min(cand.size, self.rng.randint(1, 10))),
                       np.int64)
        self.pools[p].free(ids)
        self.owner[ids] = FREE

    def op_transfer(self):
        p, q = self.rng.sample(range(len(POOLS)), 2)
        cand = self.owned(p)
        ids = np.array(self.rng.sample(cand.tolist(), min(cand.size, self.rng.randint(1, 6))),
                       np.int64)
        self.pools[p].transfer(ids, self.pools[q])
        self.owner[ids] = q
        self.lease[p] -= ids.size
        self.lease[q] += ids.size

    def op_sequence(self):
        if len(self.seqs) >= 10 or (self.seqs and self.rng.random() < 0.5):
            if self.seqs:
                seq = self.rng.choice(sorted(self.seqs))
                same(self.arena.tables.remove(seq), self.seqs.pop(seq))
            return
        p = self.rng.randrange(len(POOLS))
        cand = self.loose(p)
        if cand.size:
            ids = np.array(self.rng.sample(cand.tolist(), min(cand.size, self.rng.randint(1, 6))))
            self.arena.tables.add(self.next_seq)
            self.arena.tables.append(self.next_seq, ids)
            self.seqs[self.next_seq] = ids.astype(np.int64)
            self.next_seq += 1

    def op_shrink(self):
        if self.rng.random() < 0.7:  # the window-end pattern: drop the lowest blocks, lower leases
            for p in range(len(POOLS)):
                cand = self.loose(p)[:self.rng.randint(0, 12)]
                self.pools[p].free(cand)
                self.owner[cand] = FREE
                self.lease[p] = int((self.owner == p).sum())
                self.pools[p].resize(self.lease[p])
        keep_n = -(-sum(self.lease) // self.bpc)
        chunks = np.flatnonzero(self.mapped)
        keep, drop = chunks[:keep_n], chunks[keep_n:]
        chunk_of = np.arange(self.n) // self.bpc
        live = self.owner != FREE
        want_src = np.flatnonzero(live & np.isin(chunk_of, drop))
        want_dst = np.flatnonzero(~live & np.isin(chunk_of, keep))[:want_src.size]
        src, dst = self.arena.shrink()
        same(src, want_src)
        same(dst, want_dst)
        self.owner[dst], self.tag[dst] = self.owner[src], self.tag[src]
        self.owner[src] = FREE
        remap = np.arange(self.n)
        remap[src] = dst
        self.seqs = {s: remap[ids] for s, ids in self.seqs.items()}
        self.mapped[drop] = False
        self.check_contents()

    def op_release(self):
        if self.rng.random() < 0.3:  # the on-demand pattern: the oldest (lowest) blocks finish
            for p in range(len(POOLS)):
                cand = self.loose(p)
                cand = cand[cand < self.bpc]
                self.pools[p].free(cand)
                self.owner[cand] = FREE
                self.lease[p] = int((self.owner == p).sum())
                self.pools[p].resize(self.lease[p])
        spare = (self.mapped.sum() * self.bpc - sum(self.lease)) // self.bpc
        empty = self.mapped & ~(self.owner != FREE).reshape(-1, self.bpc).any(axis=1)
        chunks = np.flatnonzero(empty)[::-1][:max(spare, 0)]
        if chunks.size and chunks[-1] == 0 and chunks.size < self.mapped.sum():
            chunks = chunks[:-1]  # chunk 0 stays while others are mapped
        assert self.arena.release_free_chunks() == chunks.size
        self.mapped[chunks] = False

    def op_swap(self):
        if self.swapped and self.rng.random() < 0.5:  # swap a saved run back in
            data, tags = self.swapped.pop()
            p = self.rng.randrange(len(POOLS))
            room = self.lease[p] - (self.owner == p).sum()
            if room < tags.size:
                self.swapped.append((data, tags))
                return
            ids = self.pools[p].allocate(tags.size)[::-1].copy()  # any order works
            self.arena.swap_in(data, ids)
            self.owner[ids] = p
            self.tag[ids] = tags
        else:  # swap some loose blocks out and free them
            p = self.rng.randrange(len(POOLS))
            cand = self.loose(p)
            ids = np.array(self.rng.sample(cand.tolist(), min(cand.size, self.rng.randint(1, 6))),
                           np.int64)
            if not ids.size or len(self.swapped) > 8:
                return
            data = self.arena.swap_out(ids)
            self.pools[p].free(ids)
            self.owner[ids] = FREE
            self.content[ids] = -1.0  # swapped-out bytes must come from the copy, not the arena
            self.swapped.append((data, self.tag[ids].copy()))
        self.check_contents()

    def op_overwrite(self):
        live = np.flatnonzero(self.owner != FREE)
        if live.size:
            self.write(np.array(self.rng.sample(live.tolist(), min(live.size, 4)), np.int64))

    # ------------------------------------------------------------------ checks
    def check_books(self):
        a = self.arena
        same(a._owner, self.owner)
        same(a._chunk_mapped, self.mapped)
        assert [p.lease for p in self.pools] == self.lease
        assert a.mapped_bytes == self.mapped.sum() * a.chunk_bytes == a.backend.mapped_bytes
        for s, ids in self.seqs.items():
            same(a.tables.blocks(s), ids)

    def check_contents(self):
        live = np.flatnonzero(self.owner != FREE)
        got = self.content[live]
        assert (got == self.tag[live][:, None]).all(), "a live block's contents changed"
        for s, ids in self.seqs.items():
            row = self.arena.tables.device_table[self.arena.tables.row(s), :ids.size]
            same(row.numpy(), ids)

    def run(self, ops: int):
        weights = dict(resize=14, allocate=20, free=14, transfer=6, sequence=10, shrink=8,
                       release=5, swap=6, overwrite=5)
        names, w = list(weights), list(weights.values())
        for i in range(ops):
            name = self.rng.choices(names, w)[0]
            getattr(self, f"op_{name}")()
            self.counts[name] = self.counts.get(name, 0) + 1
            self.check_books()
            if i % 64 == 0:
                self.check_contents()
                check_invariants(self.arena)
        self.check_contents()
        check_invariants(self.arena)


@pytest.mark.parametrize("seed, limit_chunks, separate_mirror", [(1, 5, False), (2, None, True)])
def test_soak_random_operations_against_a_plain_model(seed, limit_chunks, separate_mirror):
    soak = Soak(seed, limit_chunks=limit_chunks, separate_mirror=separate_mirror)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        soak.run(OPS // 2)
    finally:
        soak.arena.close()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    stats = {k: soak.counts.get(k, 0) for k in ("shrink", "swap", "release")}
    print(f"\nsoak seed={seed}: {OPS // 2} ops in {dt:.1f} s wall, {cpu:.1f} s CPU = "
          f"{OPS / 2 / dt:,.0f} ops/s wall, {OPS / 2 / cpu:,.0f} ops/s CPU; "
          f"{stats}; compactions {soak.compactor.calls} ({soak.compactor.kernel_calls} by the "
          f"Triton kernel)")
    # guards the soak itself: it moved blocks, through the kernel too, and swapped
    assert soak.compactor.calls > OPS // 200 and soak.compactor.kernel_calls >= 1
    assert stats["swap"] > OPS // 100
