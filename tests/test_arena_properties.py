"""Random sequences of resize/allocate/free/transfer/write/shrink/release against a plain
model: ownership, leases, mapping and every live block's content survive any number of
compactions (which run the Triton kernel under the interpreter)."""
import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from arena import ArenaOutOfMemory, BlockTables
from tests.arena_helpers import PAGE, check_invariants, tiny_arena

POOLS = ("prefill", "decode")
MOVES: list[int] = []  # blocks moved per example, to check the test exercises compaction


class ArenaMachine(RuleBasedStateMachine):
    @initialize(limit=st.sampled_from([None, 5]), start=st.tuples(st.integers(0, 40),
                                                                  st.integers(0, 30)),
                mirror=st.booleans())
    def setup(self, limit, start, mirror):
        self.arena = tiny_arena(chunks=8, limit_chunks=limit)  # 128 blocks, 16 per chunk
        if mirror:
            # A device table separate from the host one, as on a GPU: compaction must
            # rewrite it in the kernel and the host mirror by the same remap.
            a = self.arena
            a.tables = BlockTables(16, a.capacity_blocks, a.device, num_blocks=a.capacity_blocks,
                                   separate_mirror=True, guard=a._guard)
        self.bpc = self.arena.blocks_per_chunk
        self.model = {p: {} for p in POOLS}  # pool -> {block id: content tag}
        self.lease = {p: 0 for p in POOLS}
        self.seqs = {}  # seq id -> list of block ids (each owned by some pool)
        self.next_tag = 1
        self.next_seq = 0
        self.moves = 0
        for pool, n in zip(POOLS, start):  # start from a populated arena: shorter paths to moves
            self.resize(pool, n)
            self.allocate(pool, n)

    def teardown(self):
        MOVES.append(self.moves)
        self.arena.close()

    def _write(self, block, tag):
        self.arena.blocks[block] = float(tag)

    @rule(pool=st.sampled_from(POOLS), size=st.integers(0, 140))
    def resize(self, pool, size):
        target = size
        owned = len(self.model[pool])
        if target < owned:
            return
        try:
            self.arena.pool(pool).resize(target)
        except ArenaOutOfMemory:
            other = sum(v for k, v in self.lease.items() if k != pool)
            limit_blocks = (self.arena.backend.limit_bytes or 1 << 62) // PAGE * self.bpc
            assert other + target > min(self.arena.capacity_blocks, limit_blocks)
            return
        self.lease[pool] = target

    @rule(pool=st.sampled_from(POOLS), n=st.integers(0, 20))
    def allocate(self, pool, n):
        n = min(n, self.lease[pool] - len(self.model[pool]))
        a = self.arena
        mapped = np.repeat(a._chunk_mapped, self.bpc)
        taken = {b for m in self.model.values() for b in m}
        lowest_free = [b for b in np.flatnonzero(mapped).tolist() if b not in taken][:n]
        ids = a.pool(pool).allocate(n)
        assert ids.tolist() == lowest_free  # the lowest free mapped blocks, in order
        for b in ids.tolist():
            assert all(b not in m for m in self.model.values())
            self.model[pool][b] = self.next_tag
            self._write(b, self.next_tag)
            self.next_tag += 1

    @rule(pool=st.sampled_from(POOLS), data=st.data())
    def free(self, pool, data):
        owned = sorted(self.model[pool])
        if not owned:
            return
        ids = data.draw(st.lists(st.sampled_from(owned), unique=True, max_size=8))
        in_seq = {b for blocks in self.seqs.values() for b in blocks}
        ids = [b for b in ids if b not in in_seq]
        self.arena.pool(pool).free(ids)
        for b in ids:
            del self.model[pool][b]

    @rule(src=st.sampled_from(POOLS), data=st.data())
    def transfer(self, src, data):
        dst = POOLS[1 - POOLS.index(src)]
        owned = sorted(self.model[src])
        if not owned:
            return
        ids = data.draw(st.lists(st.sampled_from(owned), unique=True, max_size=8))
        self.arena.pool(src).transfer(ids, self.arena.pool(dst))
        for b in ids:
            self.model[dst][b] = self.model[src].pop(b)
        self.lease[src] -= len(ids)
        self.lease[dst] += len(ids)

    @rule(pool=st.sampled_from(POOLS), data=st.data())
    def make_sequence(self, pool, data):
        owned = sorted(self.model[pool])
        in_seq = {b for blocks in self.seqs.values() for b in blocks}
        free_ones = [b for b in owned if b not in in_seq]
        if not free_ones or len(self.seqs) >= 8:
            return
        ids = data.draw(st.lists(st.sampled_from(free_ones), unique=True, min_size=1, max_size=6))
        self.arena.tables.add(self.next_seq)
        self.arena.tables.append(self.next_seq, ids)
        self.seqs[self.next_seq] = list(ids)
        self.next_seq += 1

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def drop_sequence(self, data):
        seq = data.draw(st.sampled_from(sorted(self.seqs)))
        ids = self.arena.tables.remove(seq)
        assert ids.tolist() == self.seqs.pop(seq)

    @rule(pool=st.sampled_from(POOLS))
    def lower_lease_to_owned(self, pool):
        self.arena.pool(pool).resize(len(self.model[pool]))
        self.lease[pool] = len(self.model[pool])

    @rule(pool=st.sampled_from(POOLS), k=st.integers(1, 24))
    def free_lowest(self, pool, k):
        """Holes at the bottom, so that a later shrink has live blocks to move down."""
        in_seq = {b for blocks in self.seqs.values() for b in blocks}
        ids = [b for b in sorted(self.model[pool]) if b not in in_seq][:k]
        self.arena.pool(pool).free(ids)
        for b in ids:
            del self.model[pool][b]

    @rule(lower=st.booleans())
    def shrink(self, lower):
        if lower:
            for pool in POOLS:
                self.lower_lease_to_owned(pool)
        src, dst = self.arena.shrink()
        self.moves += src.size
        moves = dict(zip(src.tolist(), dst.tolist()))
        for pool in POOLS:
            self.model[pool] = {moves.get(b, b): tag for b, tag in self.model[pool].items()}
        self.seqs = {s: [moves.get(b, b) for b in blocks] for s, blocks in self.seqs.items()}
        leased = sum(self.lease.values())
        assert self.arena.mapped_blocks == -(-leased // self.bpc) * self.bpc
        live = [b for m in self.model.values() for b in m]
        assert all(b < self.arena.mapped_blocks for b in live)

    @rule(pool=st.sampled_from(POOLS), k=st.integers(1, 24))
    def fragment_and_shrink(self, pool, k):
        """The window-end pattern: requests at the bottom finish, leases drop, shrink."""
        self.free_lowest(pool, k)
        self.shrink(lower=True)

    @rule()
    def release_free_chunks(self):
        self.arena.release_free_chunks()

    @invariant()
    def ownership_matches_model(self):
        for pool in POOLS:
            p = self.arena.pool(pool)
            assert p.owned().tolist() == sorted(self.model[pool])
            assert p.num_owned == len(self.model[pool]) <= p.lease == self.lease[pool]

    @invariant()
    def content_unchanged(self):
        for m in self.model.values():
            if m:
                ids = np.fromiter(m, dtype=np.int64)
                got = self.arena.blocks[torch.from_numpy(ids)].reshape(ids.size, -1)
                want = torch.tensor([float(m[b]) for b in ids.tolist()]).unsqueeze(1)
                assert torch.equal(got, want.expand_as(got))

    @invariant()
    def mapping_consistent(self):
        a = self.arena
        assert a.mapped_bytes == a.mapped_chunks * a.chunk_bytes == a.backend.mapped_bytes
        assert a.leased_blocks == sum(self.lease.values()) <= a.mapped_blocks
        live = [b for m in self.model.values() for b in m]
        assert all(a._chunk_mapped[b // self.bpc] for b in live)
        if a.backend.limit_bytes is not None:
            assert a.mapped_bytes <= a.backend.limit_bytes

    @invariant()
    def bookkeeping_consistent(self):
        check_invariants(self.arena)  # includes: chunk 0 is mapped whenever any chunk is

    @invariant()
    def tables_follow_moves(self):
        for seq, blocks in self.seqs.items():
            assert self.arena.tables.blocks(seq).tolist() == blocks
            row = self.arena.tables.row(seq)
            dev = self.arena.tables.device_table[row, :len(blocks)].tolist()
            assert dev == blocks


ArenaMachine.TestCase.settings = settings(
    # Derandomized: CI sees the same 60 programs every run (no flaky failures, and the
    # guard below can count on them); change the seed via hypothesis' own profiles locally.
    max_examples=60, stateful_step_count=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestArenaModel = ArenaMachine.TestCase


def test_the_machine_really_compacts():
    """Guards the test itself: most examples above must have moved blocks."""
    TestArenaModel("runTest").runTest()
    assert sum(m > 0 for m in MOVES) >= len(MOVES) // 4, MOVES
