"""The arena on the host backend: layout, lowest-free allocation, stable views, real release
of memory (resident set drops), swap round trips, and block tables."""
import mmap

import numpy as np
import pytest
import torch

from arena import HostMemory, KVSpec, PagedArena
from tests.arena_helpers import PAGE, tiny_arena


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_layout_and_views():
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)
    a = PagedArena(spec, 64 * PAGE, "cpu", granularity=PAGE)
    assert a.chunk_bytes % PAGE == 0 and a.chunk_bytes % spec.block_bytes == 0
    assert a.blocks.shape == (a.capacity_blocks, 3, 2, 4, 2, 8)
    kv = a.kv_cache(1)
    assert kv.shape == (a.capacity_blocks, 2, 4, 2, 8) and kv.stride(-1) == 1
    assert kv.stride(0) == spec.block_bytes // 2  # one block apart, in elements
    p = a.pool("p")
    p.resize(3)
    ids = p.allocate(3)
    kv[ids[1], 0, 2] = 7.0
    # the layer view and the block-major buffer are the same bytes
    assert torch.all(a.blocks[ids[1], 1, 0, 2] == 7.0)
    assert torch.all(a.blocks[ids[1], 0] == 0) and torch.all(a.blocks[ids[1], 2] == 0)
    a.close()


def test_lowest_free_block_first():
    a = tiny_arena(chunks=4)
    p = a.pool("p")
    p.resize(40)
    first = p.allocate(40)
    assert first.tolist() == list(range(40))
    p.free([3, 17, 5])
    assert p.allocate(2).tolist() == [3, 5]
    assert p.allocate(1).tolist() == [17]
    a.close()


def test_view_address_stable_through_grow_and_shrink():
    a = tiny_arena(chunks=8)
    addr = a.kv_cache(0).data_ptr(), a.blocks.data_ptr()
    p = a.pool("p")
    p.resize(100)
    ids = p.allocate(100)
    p.free(ids[:90])
    p.resize(10)
    a.shrink()
    assert (a.kv_cache(0).data_ptr(), a.blocks.data_ptr()) == addr
    assert a.mapped_chunks == 1
    a.close()


def test_unmapped_chunk_reads_as_zeros_after_remap():
    a = tiny_arena(chunks=4)
    p = a.pool("p")
    p.resize(32)
    ids = p.allocate(32)
    a.blocks[ids] = 5.0
    p.free(ids)
    p.resize(0)
    assert a.release_free_chunks() == 2 and a.mapped_bytes == 0
    p.resize(32)
    again = p.allocate(32)
    assert torch.count_nonzero(a.blocks[again]) == 0  # fresh memory, as from the device
    a.close()


def test_resident_memory_drops_after_shrink():
    spec = KVSpec(num_layers=4, num_kv_heads=4, head_dim=64, block_size=16, dtype=torch.float16)
    a = PagedArena(spec, 256 << 20, "cpu")  # 2 MiB chunks of 32 blocks of 64 KiB
    p = a.pool("decode")
    p.resize(2048)  # 128 MiB
    ids = p.allocate(2048)
    a.blocks[ids] = 1.0
    a.tables.add(0)
    a.tables.append(0, ids[-8:])
    tagged = a.blocks[ids[-8:]].clone()
    p.free(ids[:-8])
    p.resize(8)
    before = rss_bytes()
    src, dst = a.shrink()
    after = rss_bytes()
    assert src.size == 8 and dst.tolist() == list(range(8))
    assert a.mapped_bytes == 2 << 20 and a.stats()["unmap_calls"] == 63
    # 126 MiB were unmapped: resident memory must drop by most of it (the interpreter and
    # the allocator may take a few MiB meanwhile)
    assert before - after > 100 << 20, (before, after)
    assert torch.equal(a.blocks[a.tables.blocks(0)], tagged)
    a.close()


def test_swap_round_trip_is_byte_identical():
    a = tiny_arena(chunks=4)
    p = a.pool("p")
    p.resize(20)
    ids = p.allocate(6)
    a.blocks[ids] = torch.randn(6, *a.spec.block_shape)
    saved = a.swap_out(ids)
    want = saved.clone()
    p.free(ids)
    a.blocks[ids] = 0.0
    new = p.allocate(6)[::-1].copy()
    a.swap_in(saved, new)
    assert torch.equal(a.blocks[new], want)
    a.close()


def test_transfer_moves_ownership_and_lease_without_copy():
    a = tiny_arena(chunks=2)
    pre, dec = a.pool("prefill"), a.pool("decode")
    pre.resize(10)
    ids = pre.allocate(4)
    a.blocks[ids] = 3.0
    ptr = a.blocks.data_ptr()
    pre.transfer(ids[:3], dec)
    assert (pre.lease, pre.num_owned, dec.lease, dec.num_owned) == (7, 1, 3, 3)
    assert dec.owned().tolist() == ids[:3].tolist()
    assert a.blocks.data_ptr() == ptr and torch.all(a.blocks[ids] == 3.0)
    a.close()


def test_available_blocks_counts_mapped_and_mappable():
    a = tiny_arena(chunks=8, limit_chunks=3)  # 48 blocks may ever be mapped
    assert a.available_blocks() == 48
    a.pool("p").resize(20)
    assert a.available_blocks() == 28 and a.mapped_blocks == 32
    a.close()


def test_block_tables_rows_and_truncate():
    a = tiny_arena(chunks=2, max_seqs=4)
    t = a.tables
    r = t.add(10)
    t.append(10, [5, 6, 7])
    assert t.row(10) == r and t.blocks(10).tolist() == [5, 6, 7]
    assert t.device_table[r, :4].tolist() == [5, 6, 7, -1]
    assert t.truncate(10, 1).tolist() == [6, 7]
    assert t.device_table[r, :3].tolist() == [5, -1, -1]
    t.add(11)
    assert t.rows([11, 10]).dtype == np.int32 and len(t) == 2 and 11 in t
    assert t.remove(10).tolist() == [5]
    assert 10 not in t
    a.close()


def test_host_memory_rejects_misaligned_ranges():
    m = HostMemory(4 * PAGE, granularity=PAGE)
    with pytest.raises(ValueError, match="multiples of the granularity"):
        m.map(100, PAGE)
    with pytest.raises(ValueError, match="exceeds the reserved"):
        m.map(4 * PAGE, PAGE)
    m.map(0, PAGE)
    with pytest.raises(ValueError, match="already mapped"):
        m.map(0, PAGE)
    with pytest.raises(ValueError, match="no chunk"):
        m.unmap(PAGE, PAGE)
    m.close()
