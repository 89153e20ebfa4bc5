"""The arena on a real GPU (CUDA VMM through cuda-bindings). Skipped without CUDA."""
import pytest
import torch

import kernels
from arena import ArenaOutOfMemory, KVSpec, PagedArena
from kernels.reference import compact_blocks_ref

pytestmark = pytest.mark.gpu

SPEC = KVSpec(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.float16)
# block = 4 * 2 * 16 * 8 * 128 * 2 B = 256 KiB; 8 blocks per 2 MiB chunk


@pytest.fixture
def arena():
    a = PagedArena(SPEC, 4 << 30, "cuda")
    try:
        yield a
    finally:
        a.close()


def test_vmm_map_write_read_unmap(arena):
    p = arena.pool("decode")
    p.resize(64)
    assert arena.mapped_bytes == 64 // arena.blocks_per_chunk * arena.chunk_bytes
    ids = p.allocate(64)
    data = torch.randn(64, *SPEC.block_shape, device="cuda").half()
    arena.blocks[torch.from_numpy(ids).cuda()] = data
    torch.cuda.synchronize()
    assert torch.equal(arena.blocks[torch.from_numpy(ids).cuda()], data)
    p.free(ids)
    p.resize(0)
    arena.shrink()
    assert arena.mapped_bytes == 0 and arena.stats()["unmap_calls"] >= 8


def test_view_address_stable_and_free_memory_rises_after_shrink(arena):
    base = arena.blocks.data_ptr(), arena.kv_cache(2).data_ptr()
    p = arena.pool("decode")
    p.resize(8 * 512)  # 1 GiB
    ids = p.allocate(8 * 512)
    arena.blocks[torch.from_numpy(ids[-16:]).cuda()] = 1.0
    assert (arena.blocks.data_ptr(), arena.kv_cache(2).data_ptr()) == base
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    p.free(ids[:-16])
    p.resize(16)
    arena.shrink()
    torch.cuda.synchronize()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after - free_before >= (1 << 30) - 4 * arena.chunk_bytes
    assert (arena.blocks.data_ptr(), arena.kv_cache(2).data_ptr()) == base
    assert torch.all(arena.blocks[:16] == 1.0)


def test_compaction_on_device_preserves_content_and_tables(arena):
    p = arena.pool("decode")
    p.resize(256)
    ids = p.allocate(256)
    gen = torch.Generator(device="cuda").manual_seed(1)
    content = torch.randn(256, *SPEC.block_shape, device="cuda", generator=gen).half()
    arena.blocks[torch.from_numpy(ids).cuda()] = content
    keep = ids[::7]
    arena.tables.add(0)
    arena.tables.append(0, keep)
    expected = content[::7].clone()
    p.free(ids[[i for i in range(256) if i % 7]])
    p.resize(keep.size)
    src, dst = arena.shrink()
    assert src.size > 0
    now = torch.from_numpy(arena.tables.blocks(0)).cuda()
    assert torch.equal(arena.blocks[now], expected)
    assert arena.tables.device_table[arena.tables.row(0), :keep.size].cpu().tolist() == \
        arena.tables.blocks(0).tolist()


def test_compact_kernel_matches_reference_on_gpu():
    blocks = torch.randn(64, 4, 2, 16, 8, 128, device="cuda").half()
    perm = torch.randperm(64, device="cuda")
    src, dst = perm[:20], perm[20:40]
    table = torch.randint(-1, 64, (8, 32), device="cuda", dtype=torch.int32)
    want, want_t = blocks.clone(), table.clone()
    compact_blocks_ref(want, src, dst, want_t)
    kernels.compact_blocks(blocks, src, dst, table)
    assert torch.equal(blocks, want) and torch.equal(table, want_t)


def test_out_of_memory_leaves_nothing_mapped():
    a = PagedArena(SPEC, 4 << 30, "cuda", device_limit_bytes=64 << 20)
    try:
        with pytest.raises(ArenaOutOfMemory):
            a.pool("x").resize(8 * 64)  # 128 MiB > 64 MiB limit
        assert a.mapped_bytes == 0 and a.pool("x").lease == 0
    finally:
        a.close()


def test_kernel_launch_after_on_demand_release_keeps_chunk_0(arena):
    """Triton checks every pointer argument with cuPointerGetAttribute: the layer view's base
    lies in chunk 0, which must stay mapped while higher chunks hold live blocks."""
    p = arena.pool("decode")
    bpc = arena.blocks_per_chunk
    p.resize(3 * bpc)
    ids = p.allocate(3 * bpc)
    p.free(ids[:2 * bpc])
    p.resize(bpc)
    assert arena.release_free_chunks() == 1 and arena.mapped_chunks == 2
    kv = arena.kv_cache(0)
    key = torch.randn(1, SPEC.num_kv_heads, SPEC.head_dim, device="cuda").half()
    slot = torch.tensor([int(ids[-1]) * SPEC.block_size], device="cuda")
    kernels.write_kv(kv, key, key, slot)
    torch.cuda.synchronize()
    assert torch.equal(kv[int(ids[-1]), 0, 0], key[0])


def test_an_unclosed_arena_gives_its_memory_back_when_collected():
    import gc
    import weakref
    a = PagedArena(SPEC, 1 << 30, "cuda")
    a.pool("x").resize(8 * 64)  # 128 MiB
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    gone = weakref.ref(a.backend)
    del a
    gc.collect()
    assert gone() is None
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after - free_before >= 120 << 20
