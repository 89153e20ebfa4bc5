"""Every misuse in API.md raises a clear error and changes nothing."""
import numpy as np
import pytest
import torch

from arena import ArenaError, ArenaOutOfMemory, HostMemory, LeaseExceeded, PagedArena
from tests.arena_helpers import (PAGE, assert_same, check_invariants, snapshot, tiny_arena,
                                 tiny_spec)


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
    check_unchanged(arena, lambda: t.append(1, [-3]), ValueError, "block_ids holds ids outside")
    check_unchanged(arena, lambda: t.append(1, [arena.capacity_blocks]), ValueError,
                    r"block_ids holds ids outside \[0, 128\)")
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


# ---------------------------------------------------------------- atomicity (issue 11 §4)
def _populated(**kw):
    """Live blocks above a hole, in a sequence, leases lowered: the next shrink moves."""
    a = tiny_arena(chunks=4, **kw)
    p = a.pool("p")
    p.resize(48)
    ids = p.allocate(48)
    a.blocks[torch.from_numpy(ids)] = torch.arange(48.).view(48, 1, 1, 1, 1, 1)
    a.tables.add(7)
    a.tables.append(7, ids[40:])
    p.free(ids[:40])
    p.resize(8)
    return a


class CompactThenFail:
    """Does the whole compaction (copies and table rewrite), then fails as a late device
    error would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, blocks, src, dst, table):
        from kernels.reference import compact_blocks_ref
        self.calls += 1
        compact_blocks_ref(blocks, src, dst, table)
        raise RuntimeError("injected compaction failure")


@pytest.mark.parametrize("separate_mirror", [False, True])
def test_shrink_is_all_or_nothing_when_compaction_fails_after_the_table_rewrite(
        separate_mirror):
    from arena import BlockTables
    fail = CompactThenFail()
    a = _populated(compact_fn=fail)
    if separate_mirror:
        old = a.tables
        a.tables = BlockTables(old.max_seqs, old.max_blocks_per_seq, a.device,
                               num_blocks=a.capacity_blocks, separate_mirror=True, guard=a._guard)
        a.tables.add(7)
        a.tables.append(7, old.blocks(7))
    before = snapshot(a)
    device_before = a.tables.device_table.clone()
    live = a.pool("p").owned()
    content = a.blocks[torch.from_numpy(live)].clone()
    with pytest.raises(RuntimeError, match="injected"):
        a.shrink()
    assert fail.calls == 1
    assert_same(before, snapshot(a))
    assert torch.equal(a.tables.device_table, device_before)
    assert torch.equal(a.blocks[torch.from_numpy(live)], content)
    check_invariants(a)
    a._compact = compact_blocks_ref_fn()  # the same arena shrinks fine afterwards
    src, dst = a.shrink()
    assert src.size == 8 and a.mapped_chunks == 1
    assert torch.equal(a.blocks[torch.from_numpy(a.tables.blocks(7))], content)
    a.close()


def compact_blocks_ref_fn():
    from kernels.reference import compact_blocks_ref
    return compact_blocks_ref


class UnmapFailsOnce(HostMemory):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.fail_at = None

    def _unmap_chunk(self, offset, nbytes, payload):
        if offset == self.fail_at:
            self.fail_at = None
            raise RuntimeError("injected unmap failure")
        super()._unmap_chunk(offset, nbytes, payload)


def test_shrink_whose_unmap_fails_keeps_consistent_books_and_reports_the_moves():
    backend = UnmapFailsOnce(4 * PAGE, granularity=PAGE)
    a = PagedArena(tiny_spec(), 4 * PAGE, backend=backend, compact_fn=compact_blocks_ref_fn())
    p = a.pool("p")
    p.resize(48)
    ids = p.allocate(48)
    p.free(ids[:40])
    p.resize(8)
    backend.fail_at = PAGE  # highest first: chunk 2 unmaps, chunk 1 fails
    with pytest.raises(RuntimeError, match="injected") as info:
        a.shrink()
    src, dst = info.value.moves
    assert src.tolist() == list(range(40, 48)) and dst.tolist() == list(range(8))
    check_invariants(a)
    assert a.mapped_chunks == 2 and p.owned().tolist() == list(range(8))
    assert a.shrink()[0].size == 0 and a.mapped_chunks == 1  # the retry finishes the job
    check_invariants(a)
    a.close()


def test_allocate_that_fails_part_way_claims_nothing(monkeypatch):
    a = tiny_arena(chunks=2)
    p = a.pool("p")
    p.resize(16)
    p.allocate(10)
    # An impossible state (the free-block heap lost blocks), to reach the error path after
    # some blocks were already picked.
    a._free_heap[:] = [10, 11]
    monkeypatch.setattr(a, "_rebuild_heap", lambda exclude=(): None)
    before = snapshot(a)
    with pytest.raises(ArenaError, match="no free mapped block"):
        p.allocate(6)
    assert_same(before, snapshot(a))
    monkeypatch.undo()
    assert p.allocate(2).tolist() == [10, 11]  # the picked blocks went back to the heap
    check_invariants(a)
    a.close()


# ---------------------------------------------------------------- chunk 0 (issue 8 §2)
def test_release_free_chunks_keeps_chunk_0_while_other_chunks_are_mapped():
    a = tiny_arena(chunks=4)
    p = a.pool("p")
    p.resize(48)
    ids = p.allocate(48)
    p.free(ids[:32])  # chunks 0 and 1 empty, chunk 2 live
    p.resize(16)
    assert a.release_free_chunks() == 1  # chunk 1 only
    assert a._chunk_mapped.tolist() == [True, False, True, False]
    base = a.kv_cache(0).data_ptr() - a.backend.tensor().data_ptr()
    assert a.backend.is_mapped(base // a.chunk_bytes * a.chunk_bytes)
    p.free(p.owned())
    p.resize(0)
    assert a.release_free_chunks() == 2 and a.mapped_bytes == 0  # nothing else: 0 goes too
    check_invariants(a)
    a.close()


# ---------------------------------------------------------------- argument checks (§7, §5)
@pytest.mark.parametrize("kw, exc, match", [
    (dict(granularity=0), ValueError, "granularity"),
    (dict(granularity=1.5), TypeError, "granularity"),
    (dict(granularity=PAGE, max_seqs=2.5), TypeError, "max_seqs"),
    (dict(granularity=PAGE, max_seqs=0), ValueError, "max_seqs"),
    (dict(granularity=PAGE, chunk_bytes=float(2 * PAGE)), TypeError, "chunk_bytes"),
    (dict(granularity=PAGE, max_model_len=0), ValueError, "max_model_len"),
    (dict(granularity=PAGE, max_model_len=10.0), TypeError, "max_model_len"),
    (dict(granularity=PAGE, max_blocks_per_seq=2.0), TypeError, "max_blocks_per_seq"),
    (dict(granularity=PAGE, max_model_len=64, max_blocks_per_seq=4), ValueError, "not both"),
    (dict(granularity=PAGE, device_limit_bytes=-1), ValueError, "device_limit_bytes"),
    (dict(device="meta"), ValueError, "device must be 'cpu' or a CUDA device"),
    (dict(device="nonsense"), ValueError, "device must be 'cpu' or a CUDA device"),
    (dict(backend="host"), TypeError, "backend must be a DeviceMemory"),
])
def test_bad_arguments_name_themselves(kw, exc, match):
    kw = {"device": "cpu", **kw}
    with pytest.raises(exc, match=match):
        PagedArena(tiny_spec(), 8 * PAGE, kw.pop("device"), **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device='cuda' but no CUDA device is available"):
        PagedArena(tiny_spec(), 8 * PAGE, "cuda")


def test_truncate_needs_an_int(arena):
    check_unchanged(arena, lambda: arena.tables.truncate(1, 1.5), TypeError,
                    "num_blocks must be an int")


def test_table_width_comes_from_max_model_len():
    spec = tiny_spec()  # 4 tokens per block
    a = PagedArena(spec, 1 << 30, "cpu")  # 4 Mi blocks: a table as wide would be 64 MiB
    assert a.tables.max_blocks_per_seq == 32768 // 4
    a.close()
    a = tiny_arena(chunks=64, max_model_len=50)
    assert a.tables.max_blocks_per_seq == 13
    a.tables.add(0)
    with pytest.raises(ValueError, match="above max_blocks_per_seq=13 .*max_model_len"):
        a.tables.append(0, np.arange(14))
    a.close()
    a = tiny_arena(chunks=1, max_blocks_per_seq=5)  # explicit width still works
    assert a.tables.max_blocks_per_seq == 5
    a.close()
    a = tiny_arena(chunks=1)  # never wider than the arena: 16 blocks
    assert a.tables.max_blocks_per_seq == 16
    a.close()
