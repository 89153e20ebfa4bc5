"""GPU backend of :class:`arena.memory.DeviceMemory`: CUDA virtual memory management.

One ``cuMemAddressReserve`` at construction gives the arena a virtual range whose base never
moves; every chunk is its own physical allocation (``cuMemCreate``) mapped into the range
(``cuMemMap`` + ``cuMemSetAccess``), so chunks can be returned one by one (``cuMemUnmap`` +
``cuMemRelease``). The range is shared with torch as one tensor, one address, for the arena's
whole life, which keeps CUDA graphs captured over it valid while the arena grows and shrinks.

Every unmap (or batch of unmaps) first waits on a torch CUDA event recorded on the current
stream, so no kernel queued there can still read the chunk when it disappears (otherwise:
CUDA_ERROR_ILLEGAL_ADDRESS). An engine that runs kernels over the arena on other streams
must make the current stream wait for them before it shrinks (as it would before freeing
any memory those streams use).

Lifetime: the reservation belongs to a small :class:`_Reservation` object, which the tensor
view keeps alive (through DLPack and CuPy's ``UnownedMemory(owner=...)``); it refers to
nothing that refers back, so an arena that is never closed is freed by reference counting,
and its chunks are unmapped and the range freed when the last view goes. ``close()`` unmaps
every chunk at once; the virtual range itself is freed when the last view is collected, so a
view kept past ``close()`` never aliases another allocation — but a kernel that reads it hits
unmapped addresses: an illegal-address error that poisons the CUDA context. Drop every
``kv_cache()``/``blocks`` view (and CUDA graphs captured over them) before closing.

Everything CUDA-specific is reached through a :class:`CudaRuntime` (the driver module, the
primary context, the free-memory query, the stream wait and the tensor wrapping), so tests
run this module's logic against a fake driver on machines without a GPU.
cuda-bindings and CuPy are imported lazily, only by the default runtime.
"""
from __future__ import annotations

import torch

from .errors import ArenaOutOfMemory, ChunkReleaseFailed
from .memory import DeviceMemory


class CudaRuntime:
    """The seams between :class:`CudaMemory` and CUDA: the default goes through torch,
    cuda-bindings and CuPy. Tests pass a subclass with a fake driver."""

    @property
    def driver(self):
        """The ``cuda.bindings.driver`` module (or a stand-in with the same functions)."""
        try:
            from cuda.bindings import driver
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise ImportError("the CUDA backend needs cuda-bindings: pip install "
                              "'windowed-kv-arena[cuda12]' (or [cuda13])") from exc
        return driver

    def resolve(self, device: torch.device) -> int:
        """The CUDA device index ``device`` names (the current device for a bare "cuda").
        Raises ValueError when CUDA is not available."""
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but no CUDA device is available "
                             "(torch.cuda.is_available() is False)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: only {torch.cuda.device_count()} CUDA "
                             "device(s) exist")
        return index

    def tensor_device(self, index: int) -> torch.device:
        """Where the wrapped range lives for torch."""
        return torch.device("cuda", index)

    def init_context(self, index: int) -> None:
        """Make torch's primary context on ``index`` exist and current, before any driver
        call: the range must live in the context torch's kernels run in."""
        torch.cuda.init()
        with torch.cuda.device(index):
            torch.empty(1, device=torch.device("cuda", index))

    def device_free_bytes(self, index: int) -> int:
        """Free memory of the device, in bytes."""
        return int(torch.cuda.mem_get_info(index)[0])

    def wait_queued(self, index: int) -> None:
        """Block until every kernel queued so far on torch's current stream of ``index`` has
        finished (one event, recorded and waited on)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(index))
        event.synchronize()

    def wrap(self, base: int, nbytes: int, index: int, owner: object) -> torch.Tensor:
        """A uint8 tensor ``[nbytes]`` over device addresses ``[base, base + nbytes)``, which
        keeps ``owner`` alive as long as the tensor or any view of it lives."""
        import cupy

        mem = cupy.cuda.UnownedMemory(base, nbytes, owner=owner, device_id=index)
        array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        return torch.from_dlpack(array)


def _check(driver, result, what: str):
    """Unpack a cuda-bindings ``(CUresult, *values)`` tuple, raising on any error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _allocation_prop(driver, index: int):
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    return prop


def allocation_granularity(index: int, runtime: CudaRuntime | None = None) -> int:
    """Minimum physical allocation granularity in bytes of CUDA device ``index`` (2 MiB on
    current NVIDIA GPUs), from cuMemGetAllocationGranularity, asked once torch's primary
    context exists."""
    runtime = CudaRuntime() if runtime is None else runtime
    runtime.init_context(index)
    driver = runtime.driver
    _check(driver, driver.cuInit(0), "cuInit")
    return int(_check(driver, driver.cuMemGetAllocationGranularity(
        _allocation_prop(driver, index),
        driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity"))


class _Reservation:
    """Owns one reserved virtual range and its mapped chunks (``offset -> (nbytes, handle)``).

    It holds no reference to the :class:`CudaMemory` that fills it, so the tensor view can
    keep it alive without a reference cycle. When it is collected, chunks still mapped are
    unmapped and released (after the device finishes queued work) and the range is freed.
    """

    def __init__(self, runtime: CudaRuntime, index: int, base: int, nbytes: int):
        self.runtime, self.index, self.base, self.nbytes = runtime, index, int(base), nbytes
        self.chunks: dict[int, tuple[int, object]] = {}
        self.unreleased: list[object] = []   # handles unmapped whose release failed

    def unmap(self, offset: int, nbytes: int, handle) -> None:
        """Unmap one chunk and release its allocation. Raises ChunkReleaseFailed when the
        range was unmapped but the release failed (the handle is kept for :meth:`free`)."""
        driver = self.runtime.driver
        _check(driver, driver.cuMemUnmap(self.base + offset, nbytes), "cuMemUnmap")
        try:
            _check(driver, driver.cuMemRelease(handle), "cuMemRelease")
        except Exception as exc:
            self.unreleased.append(handle)
            raise ChunkReleaseFailed(f"chunk at offset {offset} unmapped, but {exc}") from exc

    def _release_leftovers(self) -> None:
        driver = self.runtime.driver
        while self.unreleased:
            _check(driver, driver.cuMemRelease(self.unreleased[-1]), "cuMemRelease")
            self.unreleased.pop()

    def free(self) -> None:
        """Unmap what is left and free the range (once)."""
        if self.base is None:
            return
        if self.chunks:
            self.runtime.wait_queued(self.index)
            for offset, (nbytes, handle) in list(self.chunks.items()):
                try:
                    self.unmap(offset, nbytes, handle)
                except ChunkReleaseFailed:
                    del self.chunks[offset]
                    raise
                del self.chunks[offset]
        self._release_leftovers()
        driver = self.runtime.driver
        base, self.base = self.base, None
        _check(driver, driver.cuMemAddressFree(base, self.nbytes), "cuMemAddressFree")

    def __del__(self):
        try:
            self.free()
        except Exception:  # pragma: no cover - interpreter shutdown, driver already gone
            pass


class CudaMemory(DeviceMemory):
    """A reserved CUDA virtual range on ``device`` with per-chunk physical mappings.

    ``limit_bytes`` optionally caps what this range may map (on top of the device's free
    memory), so an arena can be told to leave room for weights and activations.
    ``runtime``: the CUDA seams (default: torch + cuda-bindings + CuPy).
    """

    def __init__(self, reserved_bytes: int, *, device: str | torch.device = "cuda",
                 limit_bytes: int | None = None, runtime: CudaRuntime | None = None):
        self._runtime = runtime = CudaRuntime() if runtime is None else runtime
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        index = runtime.resolve(device)
        granularity = allocation_granularity(index, runtime)  # makes the context first
        self._setup(reserved_bytes, granularity, limit_bytes)
        driver = self._driver = runtime.driver
        self._index = index
        self.device = runtime.tensor_device(index)
        self._prop = _allocation_prop(driver, index)
        self._access = driver.CUmemAccessDesc()
        self._access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        base = _check(driver, driver.cuMemAddressReserve(self.reserved_bytes, self.granularity,
                                                         0, 0), "cuMemAddressReserve")
        self._res = _Reservation(runtime, index, int(base), self.reserved_bytes)
        self._chunks = self._res.chunks  # one book: the reservation frees what is left in it
        self._view = runtime.wrap(int(base), self.reserved_bytes, index, self._res)

    @property
    def base_address(self) -> int:
        """Virtual address of the range's first byte (constant for the backend's life)."""
        self._check_open()
        return self._res.base

    def _device_free_bytes(self) -> int:
        return self._runtime.device_free_bytes(self._index)

    def _map_chunk(self, offset: int, nbytes: int):
        driver = self._driver
        err, handle = driver.cuMemCreate(nbytes, self._prop, 0)
        if err == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise ArenaOutOfMemory("cuMemCreate: device out of memory", requested_bytes=nbytes,
                                   free_bytes=self.free_bytes())
        _check(driver, (err,), "cuMemCreate")
        addr = self._res.base + offset
        try:
            _check(driver, driver.cuMemMap(addr, nbytes, 0, handle, 0), "cuMemMap")
            try:
                _check(driver, driver.cuMemSetAccess(addr, nbytes, [self._access], 1),
                       "cuMemSetAccess")
            except BaseException:
                driver.cuMemUnmap(addr, nbytes)
                raise
        except BaseException:
            driver.cuMemRelease(handle)
            raise
        return handle

    def _wait_for_device(self) -> None:
        self._runtime.wait_queued(self._index)

    def _unmap_chunk(self, offset: int, nbytes: int, payload) -> None:
        self._res.unmap(offset, nbytes, payload)

    def _release(self) -> None:
        # The range is freed by the reservation when the last view of it is collected.
        self._res = None
