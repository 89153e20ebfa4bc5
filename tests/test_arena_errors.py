"""Every misuse in API.md raises a clear error and changes nothing."""
import numpy as np
import pytest
import torch

from arena import ArenaError, ArenaOutOfMemory, HostMemory, LeaseExceeded, PagedArena
from tests.arena_helpers import PAGE, assert_same, snapshot, tiny_arena, tiny_spec


@pytest.fixture
def arena():
    a = tiny_arena(chunks=8, limit_chunks=4)
    p = a.pool("prefill")
    p.resize(20)
    p.allocate(12)
    a.pool("decode").resize(4)
    a.tables.add(1)
    a.tables.append(1, [0, 1, 2])
    yield a
    a.close()


def check_unchanged(arena, fn, exc, match):
    before = snapshot(arena)
    with pytest.raises(exc, match=match):
        fn()
    assert_same(before, snapshot(arena))


def test_double_free(arena):
    p = arena.pool("prefill")
    p.free([11])
    check_unchanged(arena, lambda: p.free([11]), ArenaError, "does not own block 11")


def test_free_of_a_block_owned_by_another_pool(arena):
    d = arena.pool("decode")
    check_unchanged(arena, lambda: d.free([3]), ArenaError, "does not own block 3")


def test_partially_foreign_free_frees_nothing(arena):
    p = arena.pool("prefill")
    check_unchanged(arena, lambda: p.free([0, 1, 40]), ArenaError, "does not own block 40")


@pytest.mark.parametrize("ids, exc, match", [
    ([-1], ValueError, "block_ids holds ids outside"),
    ([10_000], ValueError, "block_ids holds ids outside"),
    ([1, 1], ValueError, "block_ids repeats"),
    ([1.5], TypeError, "block_ids must hold integers"),
    (["a"], TypeError, "block_ids must hold integers"),
])
def test_bad_ids(arena, ids, exc, match):
    p = arena.pool("prefill")
    check_unchanged(arena, lambda: p.free(ids), exc, match)
    check_unchanged(arena, lambda: p.transfer(ids, arena.pool("decode")), exc, match)


def test_lease_exceeded(arena):
    p = arena.pool("prefill")
    check_unchanged(arena, lambda: p.allocate(9), LeaseExceeded, "above its lease of 20")


def test_resize_below_owned(arena):
    p = arena.pool("prefill")
    check_unchanged(arena, lambda: p.resize(11), ValueError, "target_blocks=11 is below the 12")


@pytest.mark.parametrize("target, exc", [(-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_resize_bad_target(arena, target, exc):
    check_unchanged(arena, lambda: arena.pool("decode").resize(target), exc, "target_blocks")


def test_allocate_bad_n(arena):
    check_unchanged(arena, lambda: arena.pool("prefill").allocate(-2), ValueError, "n must be")


def test_transfer_not_owned(arena):
    p, d = arena.pool("prefill"), arena.pool("decode")
    check_unchanged(arena, lambda: p.transfer([15], d), ArenaError, "does not own block 15")


def test_transfer_to_itself_still_checks_ownership(arena):
    p = arena.pool("prefill")
    check_unchanged(arena, lambda: p.transfer([15], p), ArenaError, "does not own block 15")


def test_transfer_to_foreign_pool(arena):
    other = tiny_arena(chunks=2)
    try:
        check_unchanged(arena, lambda: arena.pool("prefill").transfer([0], other.pool("x")),
                        ValueError, "other is not a pool of this arena")
    finally:
        other.close()


def test_device_out_of_memory_leaves_no_partial_mapping(arena):
    # limit 4 chunks = 64 blocks; 24 are leased, 2 chunks mapped: 41 more need a 5th chunk.
    check_unchanged(arena, lambda: arena.pool("decode").resize(4 + 41), ArenaOutOfMemory,
                    "requested")
    assert arena.mapped_bytes == 2 * PAGE


def test_capacity_exceeded(arena):
    before = snapshot(arena)
    with pytest.raises(ArenaOutOfMemory) as info:
        arena.pool("decode").resize(arena.capacity_blocks)
    assert info.value.requested_bytes > info.value.free_bytes
    assert_same(before, snapshot(arena))


class FailingMemory(HostMemory):
    """Maps ``ok`` chunks, then fails every later map as a device out of memory would."""

    def __init__(self, *args, ok: int, **kw):
        super().__init__(*args, **kw)
        self.ok = ok

    def map(self, offset, nbytes):
        if self.ok <= 0:
            raise ArenaOutOfMemory("injected", requested_bytes=nbytes, free_bytes=0)
        self.ok -= 1
        super().map(offset, nbytes)


def test_map_failure_injected_mid_grow_rolls_back():
    spec = tiny_spec()
    backend = FailingMemory(8 * PAGE, granularity=PAGE, ok=3)
    a = PagedArena(spec, 8 * PAGE, backend=backend)
    p = a.pool("decode")
    p.resize(16)  # one chunk
    before = snapshot(a)
    with pytest.raises(ArenaOutOfMemory, match="requested 16384 B, free 8192 B"):
        p.resize(16 + 64)  # needs 4 more chunks; the 3rd map fails
    assert_same(before, snapshot(a))
    assert backend.mapped_bytes == PAGE and p.lease == 16
    a.close()


def test_swap_in_bad_data(arena):
    ids = arena.pool("prefill").owned()[:2]
    good = arena.swap_out(ids)
    check_unchanged(arena, lambda: arena.swap_in(good[:1], ids), ValueError, "data must be")
    check_unchanged(arena, lambda: arena.swap_in(good.double(), ids), ValueError, "data must be")
    check_unchanged(arena, lambda: arena.swap_in(good, [30, 31]), ArenaError, "owned")
    check_unchanged(arena, lambda: arena.swap_out([30]), ArenaError, "owned")


def test_block_table_misuse(arena):
    t = arena.tables
    check_unchanged(arena, lambda: t.add(1), ValueError, "seq_id 1 already")
    check_unchanged(arena, lambda: t.append(2, [0]), KeyError, "seq_id 2 has no block table")
    check_unchanged(arena, lambda: t.append(1, [-3]), ValueError, "block_ids must be block ids")
    check_unchanged(arena, lambda: t.append(1, [arena.capacity_blocks]), ValueError,
                    r"block_ids must be block ids in \[0, 128\)")
    check_unchanged(arena, lambda: t.append(1, [1.9]), TypeError, "block_ids must hold integers")
    check_unchanged(arena, lambda: t.truncate(1, 4), ValueError, "num_blocks must be in")
    width = t.max_blocks_per_seq
    check_unchanged(arena, lambda: t.append(1, np.arange(width)), ValueError, "max_blocks_per_seq")


def test_block_tables_full():
    a = tiny_arena(chunks=1, max_seqs=2)
    a.tables.add("a")
    a.tables.add("b")
    with pytest.raises(ValueError, match="max_seqs=2"):
        a.tables.add("c")
    a.close()


@pytest.mark.parametrize("kw, exc, match", [
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(head_dim=-4), ValueError, "head_dim"),
    (dict(block_size=2.5), ValueError, "block_size"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_bad_spec(kw, exc, match):
    with pytest.raises(exc, match=match):
        tiny_spec(**kw)


def test_bad_arena_arguments():
    with pytest.raises(ValueError, match="max_bytes"):
        PagedArena(tiny_spec(), 0, "cpu", granularity=PAGE)
    with pytest.raises(ValueError, match="smaller than one chunk"):
        PagedArena(tiny_spec(), 100, "cpu", granularity=PAGE)
    with pytest.raises(TypeError, match="spec"):
        PagedArena("spec", PAGE, "cpu")
    with pytest.raises(ValueError, match="chunk_bytes"):
        PagedArena(tiny_spec(), 8 * PAGE, "cpu", granularity=PAGE, chunk_bytes=PAGE + 256)
    a = tiny_arena(chunks=1)
    with pytest.raises(ValueError, match="layer must be in"):
        a.kv_cache(1)
    with pytest.raises(ValueError, match="name"):
        a.pool("")
    a.close()
