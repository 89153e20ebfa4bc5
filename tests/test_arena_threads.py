"""Several threads share one arena: every public call is atomic under the arena's lock.

Without the lock, two threads calling resize/allocate/free/shrink corrupted the accounting
(num_owned went negative, "chunk already mapped", an AssertionError in plan_shrink). Each
thread here owns a pool and some sequences, keeps a plain model of them, and checks after
every operation that the arena agrees; any thread may shrink or release chunks, which moves
the others' blocks under them, so contents are checked through the block tables.
"""
import os
import random
import sys
import threading
import time

import torch

from arena import ArenaOutOfMemory
from kernels.reference import compact_blocks_ref
from tests.arena_helpers import check_invariants, tiny_arena

THREADS = 4
SECONDS = float(os.environ.get("ARENA_STRESS_SECONDS", "3"))


class Worker:
    """One thread's share: a pool, its sequences (seq id -> (tag, blocks)), its lease."""

    def __init__(self, arena, index, seed):
        self.arena, self.index = arena, index
        self.pool = arena.pool(f"p{index}")
        self.rng = random.Random(seed)
        self.seqs: dict[int, tuple[float, int]] = {}
        self.next_seq = index * 1_000_000
        self.lease = 0
        self.ops = 0

    def check(self):
        a = self.arena
        assert self.pool.num_owned == sum(n for _, n in self.seqs.values())
        assert self.pool.lease == self.lease
        with a.lock:  # block ids move when another thread shrinks: read them and the bytes together
            for seq, (tag, n) in self.seqs.items():
                ids = a.tables.blocks(seq)
                assert ids.size == n
                assert torch.all(a.blocks[torch.from_numpy(ids)] == tag), (seq, ids)

    def step(self):
        a, rng, pool = self.arena, self.rng, self.pool
        op = rng.random()
        owned = self.pool.num_owned
        if op < 0.25:
            target = owned + rng.randint(0, 10)
            try:
                pool.resize(target)
                self.lease = target
            except ArenaOutOfMemory:
                pass
        elif op < 0.55:
            n = min(rng.randint(1, 6), self.lease - owned)
            if n > 0 and len(self.seqs) < 3:
                seq, self.next_seq = self.next_seq, self.next_seq + 1
                tag = float(seq % 9973 + 1)
                # Another thread's shrink may move any owned block: ids held outside the
                # tables go stale, so allocate, register and write under one hold of the lock.
                with a.lock:
                    ids = pool.allocate(n)
                    a.tables.add(seq)
                    a.tables.append(seq, ids)
                    a.blocks[torch.from_numpy(ids)] = tag
                self.seqs[seq] = (tag, n)
        elif op < 0.8:
            if self.seqs:
                # the oldest often: holes at the bottom give later shrinks blocks to move
                seq = min(self.seqs) if rng.random() < 0.5 else rng.choice(sorted(self.seqs))
                with a.lock:
                    pool.free(a.tables.remove(seq))
                del self.seqs[seq]
        elif op < 0.9:  # the window end: the oldest (lowest) sequence finishes, leases drop
            if self.seqs:
                seq = min(self.seqs)
                with a.lock:
                    pool.free(a.tables.remove(seq))
                del self.seqs[seq]
            self.lease = pool.num_owned
            pool.resize(self.lease)
            a.shrink()
        else:
            a.release_free_chunks()
        self.ops += 1
        self.check()


def run_workers(arena, seconds, seed=0):
    workers = [Worker(arena, i, seed * 100 + i) for i in range(THREADS)]
    errors = []
    deadline = time.monotonic() + seconds

    def loop(w):
        try:
            while time.monotonic() < deadline:
                w.step()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append((w.index, repr(exc)))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: races show up in seconds, not hours
    try:
        threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    return workers, errors


def test_threads_share_an_arena_without_corruption():
    arena = tiny_arena(chunks=16, limit_chunks=12, max_seqs=32, compact_fn=compact_blocks_ref)
    try:
        workers, errors = run_workers(arena, SECONDS)
        assert not errors, errors
        check_invariants(arena)
        for w in workers:
            w.check()
        ops = sum(w.ops for w in workers)
        moves = arena.stats()["moves"]
        print(f"\nthread stress: {THREADS} threads, {ops} operations in {SECONDS:.0f} s, "
              f"{arena.stats()['shrinks']} shrinks, {moves} moves")
        assert ops > 1000 and moves > 0  # the test exercised contention and compaction
    finally:
        arena.close()
