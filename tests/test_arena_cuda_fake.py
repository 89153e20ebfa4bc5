"""The CUDA backend (arena/cuda_memory.py) against a fake driver (tests/fake_cuda.py): argument
values, call order, cleanup after a failure at every step, mapped-bytes accounting, and
lifetime (no reference cycle; the range is freed only when the last view is gone)."""
import gc
import weakref

import pytest
import torch

from arena import ArenaError, ArenaOutOfMemory, PagedArena
from arena.cuda_memory import CudaMemory
from kernels.reference import compact_blocks_ref
from tests.arena_helpers import check_invariants, tiny_spec
from tests.fake_cuda import CUresult, FakeDriver, FakeRuntime

G = 64 << 10  # the fake device's granularity: small, so arenas stay small


def backend(chunks=8, capacity_chunks=64, limit_chunks=None, **kw):
    driver = FakeDriver(granularity=G, capacity=capacity_chunks * G)
    runtime = FakeRuntime(driver)
    limit = None if limit_chunks is None else limit_chunks * G
    mem = CudaMemory(chunks * G, device="cuda", limit_bytes=limit, runtime=runtime, **kw)
    return mem, driver, runtime


def test_construction_makes_the_context_first_then_queries_and_reserves():
    mem, d, _ = backend()
    names = d.names()
    assert names[:4] == ["init_context", "cuInit", "cuMemGetAllocationGranularity",
                         "cuMemAddressReserve"]
    _, prop, option = d.calls[2]
    assert prop.type == d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    assert prop.location.type == d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    assert prop.location.id == 0
    assert option == d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    _, size, alignment, addr, flags = d.calls[3]
    assert (size, alignment, addr, flags) == (8 * G, G, 0, 0)
    assert mem.granularity == G and mem.reserved_bytes == 8 * G
    assert d.reservations == {mem.base_address: 8 * G}
    assert mem.tensor().shape == (8 * G,) and mem.mapped_bytes == 0
    mem.close()


def test_reserved_bytes_must_be_a_granularity_multiple():
    d = FakeDriver(granularity=G)
    with pytest.raises(ValueError, match="multiple of the granularity"):
        CudaMemory(G + 4096, runtime=FakeRuntime(d))
    assert d.reservations == {}


def test_map_creates_maps_then_grants_access_with_the_right_arguments():
    mem, d, _ = backend()
    d.calls.clear()
    mem.map(2 * G, 2 * G)
    assert d.names() == ["cuMemCreate", "cuMemMap", "cuMemSetAccess"]
    (_, size, prop, flags), (_, ptr, msize, off, handle, mflags), (_, aptr, asize, descs, n) = d.calls
    base = mem.base_address
    assert (size, flags) == (2 * G, 0) and prop.location.id == 0
    assert (ptr, msize, off, mflags) == (base + 2 * G, 2 * G, 0, 0) and handle in d.allocations
    assert (aptr, asize, n) == (base + 2 * G, 2 * G, 1)
    assert descs[0].flags == d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    assert descs[0].location.type == d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    assert mem.mapped_bytes == d.mapped_bytes() == d.allocated_bytes() == 2 * G
    mem.close()


def test_unmap_waits_once_then_unmaps_and_releases_each_chunk():
    mem, d, rt = backend()
    for c in range(3):
        mem.map(c * G, G)
    d.calls.clear()
    mem.unmap_many([(0, G), (2 * G, G)])
    assert d.names() == ["wait_queued", "cuMemUnmap", "cuMemRelease", "cuMemUnmap",
                         "cuMemRelease"]
    assert mem.mapped_bytes == d.mapped_bytes() == d.allocated_bytes() == G
    assert list(d.mappings) == [mem.base_address + G]
    mem.close()
    assert d.mappings == {} and d.allocations == {}


@pytest.mark.parametrize("step, error, exc", [
    ("cuMemCreate", CUresult.CUDA_ERROR_OUT_OF_MEMORY, ArenaOutOfMemory),
    ("cuMemCreate", CUresult.CUDA_ERROR_INVALID_VALUE, RuntimeError),
    ("cuMemMap", CUresult.CUDA_ERROR_INVALID_VALUE, RuntimeError),
    ("cuMemSetAccess", CUresult.CUDA_ERROR_INVALID_VALUE, RuntimeError),
])
def test_a_failure_at_every_step_of_map_leaves_nothing_behind(step, error, exc):
    mem, d, _ = backend()
    mem.map(0, G)
    before = (dict(d.allocations), dict(d.mappings), dict(d.access))
    d.fail(step, error)
    with pytest.raises(exc, match="cuMem|out of memory"):
        mem.map(G, G)
    assert (d.allocations, d.mappings, d.access) == before
    assert mem.mapped_bytes == G and not mem.is_mapped(G)
    mem.map(G, G)  # and the same chunk maps fine afterwards
    assert mem.mapped_bytes == d.mapped_bytes() == 2 * G
    mem.close()


@pytest.mark.parametrize("step", ["cuMemUnmap", "cuMemRelease"])
def test_an_unmap_failure_part_way_keeps_the_books_true(step):
    mem, d, _ = backend()
    for c in range(3):
        mem.map(c * G, G)
    (base,) = d.reservations  # the one reserved range
    d.fail(step, after=1)  # the second chunk fails
    with pytest.raises(Exception, match=step):
        mem.unmap_many([(0, G), (G, G), (2 * G, G)])
    # The books agree with the driver: a failed cuMemUnmap leaves the chunk mapped; a failed
    # cuMemRelease comes after the range was unmapped, so the chunk counts as unmapped.
    for c in range(3):
        assert mem.is_mapped(c * G) == (base + c * G in d.mappings), (step, c)
    second_mapped = step == "cuMemUnmap"
    assert mem.is_mapped(G) == second_mapped and mem.is_mapped(2 * G)
    assert mem.mapped_bytes == (2 if second_mapped else 1) * G
    # Nothing is stuck: the rest unmaps, close succeeds and every allocation is released.
    mem.close()
    assert d.mappings == {} and d.allocations == {}


def test_limit_and_device_free_memory_clamp_free_bytes():
    mem, d, _ = backend(chunks=8, capacity_chunks=5, limit_chunks=3)
    assert mem.free_bytes() == 3 * G
    mem.map(0, 2 * G)
    assert mem.free_bytes() == G
    with pytest.raises(ArenaOutOfMemory, match="limit"):
        mem.map(2 * G, 2 * G)
    assert "cuMemCreate" not in d.names()[-1:]  # refused before asking the device
    mem.close()
    mem, d, _ = backend(chunks=8, capacity_chunks=3)
    assert mem.free_bytes() == 3 * G
    with pytest.raises(ArenaOutOfMemory, match="device out of memory"):
        mem.map(0, 4 * G)
    assert d.allocations == {}
    mem.close()


def test_close_unmaps_now_and_frees_the_range_when_the_last_view_goes():
    mem, d, _ = backend()
    mem.map(0, G)
    view = mem.tensor()[:16]
    base = mem.base_address
    mem.close()
    assert d.mappings == {} and d.allocations == {}
    assert d.reservations == {base: 8 * G}  # a kept view never aliases a new allocation
    with pytest.raises(ArenaError, match="arena is closed"):
        mem.map(0, G)
    del view
    gc.collect()
    assert d.reservations == {} and d.names()[-1] == "cuMemAddressFree"


def test_a_backend_never_closed_is_freed_by_reference_counting_alone():
    """The old backend made a cycle (backend -> view -> DLPack -> cupy -> owner=backend) that
    CuPy's objects hide from the garbage collector: an unclosed arena was never freed."""
    d = FakeDriver(granularity=G)
    gc.disable()
    try:
        mem = CudaMemory(8 * G, runtime=FakeRuntime(d))
        mem.map(0, G)
        mem.map(3 * G, G)
        view = mem.tensor()[G:]
        gone = weakref.ref(mem)
        del mem
        assert gone() is None
        assert d.mapped_bytes() == 2 * G  # a view is alive: the memory stays valid under it
        del view
        assert d.mappings == {} and d.allocations == {} and d.reservations == {}
        assert d.names()[-6:] == ["wait_queued", "cuMemUnmap", "cuMemRelease", "cuMemUnmap",
                                  "cuMemRelease", "cuMemAddressFree"]
    finally:
        gc.enable()


def test_an_arena_never_closed_is_freed_by_the_collector():
    d = FakeDriver(granularity=G)
    arena = PagedArena(tiny_spec(), 8 * G, backend=CudaMemory(8 * G, runtime=FakeRuntime(d)),
                       compact_fn=compact_blocks_ref)
    arena.pool("p").resize(arena.blocks_per_chunk * 2)
    kv = arena.kv_cache(0)
    assert d.mapped_bytes() == 2 * G
    del arena
    gc.collect()  # arena <-> pool is an ordinary cycle
    assert d.mapped_bytes() == 2 * G and d.reservations
    del kv
    gc.collect()
    assert d.mappings == {} and d.allocations == {} and d.reservations == {}


def test_arena_over_the_fake_driver_accounts_every_byte():
    d = FakeDriver(granularity=G, capacity=6 * G)
    mem = CudaMemory(8 * G, runtime=FakeRuntime(d))
    a = PagedArena(tiny_spec(), 8 * G, backend=mem, compact_fn=compact_blocks_ref)
    bpc = a.blocks_per_chunk
    p = a.pool("p")
    p.resize(3 * bpc)
    assert a.mapped_bytes == d.mapped_bytes() == 3 * G
    d.fail("cuMemSetAccess", after=1)  # the second of three new chunks fails
    with pytest.raises(RuntimeError, match="cuMemSetAccess"):
        p.resize(6 * bpc)
    assert a.mapped_bytes == d.mapped_bytes() == d.allocated_bytes() == 3 * G and p.lease == 3 * bpc
    with pytest.raises(ArenaOutOfMemory):
        p.resize(7 * bpc)  # the device has 6 chunks
    assert a.mapped_bytes == d.mapped_bytes() == 3 * G
    ids = p.allocate(3 * bpc)
    a.blocks[torch.from_numpy(ids)] = torch.arange(3. * bpc).view(-1, 1, 1, 1, 1, 1)
    a.tables.add(0)
    a.tables.append(0, ids[-4:])
    p.free(ids[:-4])
    p.resize(4)
    src, dst = a.shrink()
    assert src.size == 4 and a.mapped_bytes == d.mapped_bytes() == G
    assert a.blocks[torch.from_numpy(a.tables.blocks(0))].flatten(1)[:, 0].tolist() == \
        [float(i) for i in range(3 * bpc - 4, 3 * bpc)]
    check_invariants(a)
    a.close()
    assert d.mappings == {} and d.allocations == {}


def test_granularity_query_before_a_context_fails_in_the_fake():
    """Guards the fake itself: it would catch a backend that queried before making the
    context (the old order in PagedArena)."""
    from arena.cuda_memory import _allocation_prop, _check
    d = FakeDriver(granularity=G)
    d.cuInit(0)
    with pytest.raises(RuntimeError, match="INVALID_CONTEXT"):
        _check(d, d.cuMemGetAllocationGranularity(
            _allocation_prop(d, 0), d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity")


def test_every_driver_name_the_backend_uses_exists_in_cuda_bindings():
    driver = pytest.importorskip("cuda.bindings.driver")
    for name in ["cuInit", "cuGetErrorName", "cuMemGetAllocationGranularity",
                 "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease",
                 "cuMemMap", "cuMemUnmap", "cuMemSetAccess", "CUmemAllocationProp",
                 "CUmemAccessDesc", "CUresult", "CUmemAllocationType", "CUmemLocationType",
                 "CUmemAccess_flags", "CUmemAllocationGranularity_flags"]:
        assert hasattr(driver, name), name


def test_default_runtime_orders_unmaps_with_a_torch_event_on_the_current_stream(monkeypatch):
    """No CuPy stream (ExternalStream is deprecated in CuPy 14): one torch event, recorded
    on torch's current stream of the arena's device, then waited on."""
    from arena.cuda_memory import CudaRuntime
    log = []

    class Event:
        def record(self, stream):
            log.append(("record", stream))

        def synchronize(self):
            log.append(("synchronize",))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index: f"stream-of-{index}")
    CudaRuntime().wait_queued(3)
    assert log == [("record", "stream-of-3"), ("synchronize",)]


def test_default_runtime_makes_torch_context_before_the_driver_is_asked(monkeypatch):
    from arena.cuda_memory import CudaRuntime, allocation_granularity
    log = []
    d = FakeDriver(granularity=G, device_index=1)

    class Runtime(CudaRuntime):
        driver = d

    monkeypatch.setattr(torch.cuda, "init", lambda: log.append("torch.cuda.init"))

    class Device:
        def __init__(self, index):
            log.append(("device", index))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Device)
    real_empty = torch.empty

    def empty(*shape, device=None, **kw):
        if device is not None and torch.device(device).type == "cuda":
            log.append(("empty", str(device)))
            d.context = True  # what torch's first allocation does: the primary context
            return real_empty(*shape, **kw)
        return real_empty(*shape, device=device, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    assert allocation_granularity(1, Runtime()) == G
    assert log == ["torch.cuda.init", ("device", 1), ("empty", "cuda:1")]
    assert d.names() == ["cuInit", "cuMemGetAllocationGranularity"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_default_runtime_without_cuda_is_a_clear_error():
    from arena.cuda_memory import CudaRuntime
    with pytest.raises(ValueError, match="no CUDA device is available"):
        CudaMemory(8 * G, device="cuda:0", runtime=CudaRuntime())


@pytest.mark.parametrize("how", ["shrink", "release_free_chunks"])
def test_a_failed_unmap_never_leaves_chunk_0_unmapped_under_mapped_chunks(how):
    """Chunks go highest first, so a device failure part-way leaves a run from chunk 0."""
    d = FakeDriver(granularity=G)
    a = PagedArena(tiny_spec(), 8 * G, backend=CudaMemory(8 * G, runtime=FakeRuntime(d)),
                   compact_fn=compact_blocks_ref)
    bpc = a.blocks_per_chunk
    p = a.pool("p")
    p.resize(3 * bpc)
    p.resize(0)
    d.fail("cuMemUnmap", after=1)  # the second unmap of the batch fails
    with pytest.raises(Exception, match="cuMemUnmap"):
        a.shrink() if how == "shrink" else a.release_free_chunks()
    mapped = [a._mem.is_mapped(c * a.chunk_bytes) for c in range(a.num_chunks)]
    assert mapped[0], mapped
    assert mapped == sorted(mapped, reverse=True), mapped   # a run from the bottom
    check_invariants(a)
    a.close()


def test_a_failed_close_leaves_the_arena_open_and_can_be_retried():
    d = FakeDriver(granularity=G)
    a = PagedArena(tiny_spec(), 8 * G, backend=CudaMemory(8 * G, runtime=FakeRuntime(d)),
                   compact_fn=compact_blocks_ref)
    a.pool("p").resize(2 * a.blocks_per_chunk)
    d.fail("cuMemUnmap", after=1)
    with pytest.raises(Exception, match="cuMemUnmap"):
        a.close()
    assert not a.closed
    a.close()
    assert a.closed and d.mappings == {}
