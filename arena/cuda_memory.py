"""GPU backend of :class:`arena.memory.DeviceMemory`: CUDA virtual memory management.

One ``cuMemAddressReserve`` at construction gives the arena a virtual range whose base never
moves; every chunk is its own physical allocation (``cuMemCreate``) mapped into the range
(``cuMemMap`` + ``cuMemSetAccess``), so chunks can be returned one by one (``cuMemUnmap`` +
``cuMemRelease``). The range is wrapped as a CuPy array over ``UnownedMemory`` and shared with
torch by DLPack: one tensor, one address, for the arena's whole life, which keeps CUDA graphs
captured over it valid while the arena grows and shrinks.

Every unmap (or batch of unmaps) first waits on a CuPy event recorded on the current torch
stream, so no kernel queued there can still read the chunk when it disappears (otherwise:
CUDA_ERROR_ILLEGAL_ADDRESS). An engine that runs kernels over the arena on other streams
must make the current stream wait for them before it shrinks (as it would before freeing
any memory those streams use).

cuda-bindings and CuPy are imported here only, lazily: the CPU path never needs them.
"""
from __future__ import annotations

import torch

from .errors import ArenaOutOfMemory
from .memory import DeviceMemory


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError("the CUDA backend needs cuda-bindings: pip install "
                          "'windowed-kv-arena[cuda12]' (or [cuda13])") from exc
    return driver


def _check(result, what: str):
    """Unpack a cuda-bindings ``(CUresult, *values)`` tuple, raising on any error."""
    driver = _driver()
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


def allocation_granularity(index: int) -> int:
    """Minimum physical allocation granularity in bytes of CUDA device ``index`` (2 MiB on
    current NVIDIA GPUs), from cuMemGetAllocationGranularity."""
    driver = _driver()
    _check(driver.cuInit(0), "cuInit")
    return int(_check(driver.cuMemGetAllocationGranularity(
        _allocation_prop(driver, index),
        driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
        "cuMemGetAllocationGranularity"))


class CudaMemory(DeviceMemory):
    """A reserved CUDA virtual range on ``device`` with per-chunk physical mappings.

    ``limit_bytes`` optionally caps what this range may map (on top of the device's free
    memory), so an arena can be told to leave room for weights and activations.
    """

    def __init__(self, reserved_bytes: int, *, device: str | torch.device = "cuda",
                 limit_bytes: int | None = None):
        driver = _driver()
        import cupy

        self._cupy = cupy
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {self.device}")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        # Make torch's primary context current so the range lives where torch's kernels run.
        torch.cuda.init()
        with torch.cuda.device(index):
            torch.empty(1, device=self.device)
        self._index = index
        self.granularity = allocation_granularity(index)
        self._prop = _allocation_prop(driver, index)
        self._access = driver.CUmemAccessDesc()
        self._access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = index
        self._access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        if reserved_bytes <= 0 or reserved_bytes % self.granularity:
            raise ValueError(f"reserved_bytes must be a positive multiple of the device "
                             f"granularity {self.granularity}, got {reserved_bytes}")
        self.reserved_bytes = int(reserved_bytes)
        self.limit_bytes = None if limit_bytes is None else int(limit_bytes)
        self._base = _check(driver.cuMemAddressReserve(self.reserved_bytes, self.granularity,
                                                       0, 0), "cuMemAddressReserve")
        self._handles: dict[int, tuple[object, int]] = {}
        self._mapped = 0
        mem = cupy.cuda.UnownedMemory(int(self._base), self.reserved_bytes, owner=self,
                                      device_id=index)
        array = cupy.ndarray((self.reserved_bytes,), dtype=cupy.uint8,
                             memptr=cupy.cuda.MemoryPointer(mem, 0))
        self._view = torch.from_dlpack(array)

    @property
    def base_address(self) -> int:
        """Virtual address of the range's first byte (constant for the backend's life)."""
        return int(self._base)

    @property
    def mapped_bytes(self) -> int:
        return self._mapped

    def free_bytes(self) -> int:
        free_device, _ = torch.cuda.mem_get_info(self.device)
        free = min(int(free_device), self.reserved_bytes - self._mapped)
        if self.limit_bytes is not None:
            free = min(free, max(0, self.limit_bytes - self._mapped))
        return free

    def map(self, offset: int, nbytes: int) -> None:
        self._check_range(offset, nbytes)
        if offset in self._handles:
            raise ValueError(f"a chunk is already mapped at offset {offset}")
        if self.limit_bytes is not None and self._mapped + nbytes > self.limit_bytes:
            raise ArenaOutOfMemory("CUDA backend: arena limit reached", requested_bytes=nbytes,
                                   free_bytes=self.free_bytes())
        driver = _driver()
        err, handle = driver.cuMemCreate(nbytes, self._prop, 0)
        if err == driver.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise ArenaOutOfMemory("cuMemCreate: device out of memory", requested_bytes=nbytes,
                                   free_bytes=self.free_bytes())
        _check((err,), "cuMemCreate")
        addr = int(self._base) + offset
        try:
            _check(driver.cuMemMap(addr, nbytes, 0, handle, 0), "cuMemMap")
            try:
                _check(driver.cuMemSetAccess(addr, nbytes, [self._access], 1), "cuMemSetAccess")
            except Exception:
                driver.cuMemUnmap(addr, nbytes)
                raise
        except Exception:
            driver.cuMemRelease(handle)
            raise
        self._handles[offset] = (handle, nbytes)
        self._mapped += nbytes

    def unmap(self, offset: int, nbytes: int) -> None:
        self.unmap_many([(offset, nbytes)])

    def unmap_many(self, ranges: list[tuple[int, int]]) -> None:
        for offset, nbytes in ranges:
            entry = self._handles.get(offset)
            if entry is None or entry[1] != nbytes:
                raise ValueError(f"no chunk of {nbytes} bytes is mapped at offset {offset}")
        if not ranges:
            return
        driver = _driver()
        cupy = self._cupy
        # One wait for the batch: every kernel queued so far on torch's stream is done.
        with cupy.cuda.Device(self._index):
            stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(self.device).cuda_stream)
            event = cupy.cuda.Event(disable_timing=True)
            event.record(stream)
            event.synchronize()
        for offset, nbytes in ranges:
            addr = int(self._base) + offset
            _check(driver.cuMemUnmap(addr, nbytes), "cuMemUnmap")
            _check(driver.cuMemRelease(self._handles[offset][0]), "cuMemRelease")
            del self._handles[offset]
            self._mapped -= nbytes

    def tensor(self) -> torch.Tensor:
        return self._view

    def close(self) -> None:
        if self._base is None:
            return
        # One wait on the device for all of them, as a shrink does.
        self.unmap_many([(offset, nbytes) for offset, (_, nbytes) in self._handles.items()])
        self._view = None
        _check(_driver().cuMemAddressFree(self._base, self.reserved_bytes), "cuMemAddressFree")
        self._base = None
