"""A stand-in for the ``cuda.bindings.driver`` functions arena/cuda_memory.py calls, and a
:class:`CudaRuntime` around it, so the CUDA backend's logic runs in CI without a GPU.

The fake keeps its own tables (reservations, physical allocations, mappings, access), checks
every argument the way the driver documents it (alignment to the granularity, a mapping
inside a reservation, access only on mapped ranges, nothing mapped when a range is freed),
logs every call, and fails any call on request. The wrapped "device" tensor is host memory,
so an arena over the fake runs whole workloads (compaction included) on the CPU.
"""
from __future__ import annotations

import enum
import mmap
from types import SimpleNamespace

import torch

from arena.cuda_memory import CudaRuntime


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_INVALID_CONTEXT = 201


class CUmemAllocationType(enum.IntEnum):
    CU_MEM_ALLOCATION_TYPE_INVALID = 0
    CU_MEM_ALLOCATION_TYPE_PINNED = 1


class CUmemLocationType(enum.IntEnum):
    CU_MEM_LOCATION_TYPE_INVALID = 0
    CU_MEM_LOCATION_TYPE_DEVICE = 1


class CUmemAccess_flags(enum.IntEnum):
    CU_MEM_ACCESS_FLAGS_PROT_NONE = 0
    CU_MEM_ACCESS_FLAGS_PROT_READ = 1
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class CUmemAllocationGranularity_flags(enum.IntEnum):
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1


def _location():
    return SimpleNamespace(type=CUmemLocationType.CU_MEM_LOCATION_TYPE_INVALID, id=-1)


class CUmemAllocationProp(SimpleNamespace):
    def __init__(self):
        super().__init__(type=CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_INVALID,
                         location=_location())


class CUmemAccessDesc(SimpleNamespace):
    def __init__(self):
        super().__init__(location=_location(), flags=CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_NONE)


class FakeDriver:
    """The driver functions the backend uses, over a fake device of ``capacity`` bytes."""

    CUresult = CUresult
    CUmemAllocationType = CUmemAllocationType
    CUmemLocationType = CUmemLocationType
    CUmemAccess_flags = CUmemAccess_flags
    CUmemAllocationGranularity_flags = CUmemAllocationGranularity_flags
    CUmemAllocationProp = CUmemAllocationProp
    CUmemAccessDesc = CUmemAccessDesc

    def __init__(self, *, granularity: int = 2 << 20, capacity: int = 1 << 30,
                 device_index: int = 0):
        self.granularity, self.capacity, self.device_index = granularity, capacity, device_index
        self.context = False   # set by FakeRuntime.init_context (torch's primary context)
        self.initialised = False
        self.reservations: dict[int, int] = {}          # base -> size
        self.allocations: dict[int, int] = {}           # handle -> size
        self.mappings: dict[int, tuple[int, int]] = {}  # address -> (size, handle)
        self.access: dict[int, int] = {}                # mapped address -> flags
        self.calls: list[tuple] = []
        self.failures: dict[str, list[CUresult]] = {}
        self._next_base = 0x7F00_0000_0000
        self._next_handle = 1

    # ---------------------------------------------------------------- test controls
    def fail(self, name: str, error: CUresult = CUresult.CUDA_ERROR_INVALID_VALUE,
             after: int = 0) -> None:
        """Make the ``after``-th next call of ``name`` (0: the next one) return ``error``."""
        self.failures.setdefault(name, []).extend([CUresult.CUDA_SUCCESS] * after + [error])

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def allocated_bytes(self) -> int:
        return sum(self.allocations.values())

    def mapped_bytes(self) -> int:
        return sum(size for size, _ in self.mappings.values())

    def _enter(self, name, *args):
        self.calls.append((name, *args))
        queue = self.failures.get(name)
        if queue:
            err = queue.pop(0)
            if err != CUresult.CUDA_SUCCESS:
                return err
        if name not in ("cuInit", "cuGetErrorName") and not self.context:
            return CUresult.CUDA_ERROR_INVALID_CONTEXT
        if name not in ("cuInit", "cuGetErrorName") and not self.initialised:
            return CUresult.CUDA_ERROR_NOT_INITIALIZED
        return CUresult.CUDA_SUCCESS

    def _aligned(self, *values) -> bool:
        return all(v % self.granularity == 0 for v in values)

    def _prop_ok(self, prop) -> bool:
        return (prop.type == CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
                and prop.location.type == CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
                and prop.location.id == self.device_index)

    def _reservation_of(self, addr: int, size: int):
        for base, rsize in self.reservations.items():
            if base <= addr and addr + size <= base + rsize:
                return base
        return None

    # ---------------------------------------------------------------- the driver API
    def cuGetErrorName(self, err):
        self.calls.append(("cuGetErrorName", err))
        return CUresult.CUDA_SUCCESS, CUresult(err).name.encode()

    def cuInit(self, flags):
        err = self._enter("cuInit", flags)
        if err == CUresult.CUDA_SUCCESS:
            self.initialised = True
        return (err,)

    def cuMemGetAllocationGranularity(self, prop, option):
        err = self._enter("cuMemGetAllocationGranularity", prop, option)
        if err == CUresult.CUDA_SUCCESS and not self._prop_ok(prop):
            err = CUresult.CUDA_ERROR_INVALID_VALUE
        return err, (self.granularity if err == CUresult.CUDA_SUCCESS else 0)

    def cuMemAddressReserve(self, size, alignment, addr, flags):
        err = self._enter("cuMemAddressReserve", size, alignment, addr, flags)
        if err == CUresult.CUDA_SUCCESS and (size <= 0 or not self._aligned(size, alignment)):
            err = CUresult.CUDA_ERROR_INVALID_VALUE
        if err != CUresult.CUDA_SUCCESS:
            return err, 0
        base = self._next_base
        self._next_base += size + self.granularity
        self.reservations[base] = size
        return err, base

    def cuMemAddressFree(self, ptr, size):
        err = self._enter("cuMemAddressFree", ptr, size)
        if err == CUresult.CUDA_SUCCESS:
            mapped_inside = any(ptr <= a < ptr + size for a in self.mappings)
            if self.reservations.get(ptr) != size or mapped_inside:
                err = CUresult.CUDA_ERROR_INVALID_VALUE
            else:
                del self.reservations[ptr]
        return (err,)

    def cuMemCreate(self, size, prop, flags):
        err = self._enter("cuMemCreate", size, prop, flags)
        if err == CUresult.CUDA_SUCCESS:
            if size <= 0 or not self._aligned(size) or not self._prop_ok(prop) or flags != 0:
                err = CUresult.CUDA_ERROR_INVALID_VALUE
            elif self.allocated_bytes() + size > self.capacity:
                err = CUresult.CUDA_ERROR_OUT_OF_MEMORY
        if err != CUresult.CUDA_SUCCESS:
            return err, None
        handle = self._next_handle
        self._next_handle += 1
        self.allocations[handle] = size
        return err, handle

    def cuMemRelease(self, handle):
        err = self._enter("cuMemRelease", handle)
        if err == CUresult.CUDA_SUCCESS:
            if handle not in self.allocations or any(h == handle for _, h in self.mappings.values()):
                err = CUresult.CUDA_ERROR_INVALID_VALUE  # stricter than CUDA: release after unmap
            else:
                del self.allocations[handle]
        return (err,)

    def cuMemMap(self, ptr, size, offset, handle, flags):
        err = self._enter("cuMemMap", ptr, size, offset, handle, flags)
        if err == CUresult.CUDA_SUCCESS:
            overlaps = any(a < ptr + size and ptr < a + s for a, (s, _) in self.mappings.items())
            if (self.allocations.get(handle) != size or offset != 0 or flags != 0
                    or not self._aligned(ptr, size) or self._reservation_of(ptr, size) is None
                    or overlaps):
                err = CUresult.CUDA_ERROR_INVALID_VALUE
            else:
                self.mappings[ptr] = (size, handle)
        return (err,)

    def cuMemSetAccess(self, ptr, size, descs, count):
        err = self._enter("cuMemSetAccess", ptr, size, descs, count)
        if err == CUresult.CUDA_SUCCESS:
            ok = (self.mappings.get(ptr, (None,))[0] == size and count == len(descs) == 1
                  and descs[0].location.type == CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
                  and descs[0].location.id == self.device_index
                  and descs[0].flags == CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            if not ok:
                err = CUresult.CUDA_ERROR_INVALID_VALUE
            else:
                self.access[ptr] = descs[0].flags
        return (err,)

    def cuMemUnmap(self, ptr, size):
        err = self._enter("cuMemUnmap", ptr, size)
        if err == CUresult.CUDA_SUCCESS:
            if self.mappings.get(ptr, (None,))[0] != size:
                err = CUresult.CUDA_ERROR_INVALID_VALUE
            else:
                del self.mappings[ptr]
                self.access.pop(ptr, None)
        return (err,)


class _OwnedBuffer(mmap.mmap):
    """Host memory standing in for the device range; keeps the owner alive as DLPack would."""
    owner = None


class FakeRuntime(CudaRuntime):
    """The CUDA seams over :class:`FakeDriver`; the arena's tensor lives on the CPU."""

    def __init__(self, driver: FakeDriver | None = None, *, device_count: int = 1):
        self._driver = FakeDriver() if driver is None else driver
        self.device_count = device_count
        self.waits = 0

    @property
    def driver(self):
        return self._driver

    def resolve(self, device: torch.device) -> int:
        index = 0 if device.index is None else device.index
        if not 0 <= index < self.device_count:
            raise ValueError(f"device={str(device)!r}: only {self.device_count} CUDA device(s)")
        return index

    def tensor_device(self, index: int) -> torch.device:
        return torch.device("cpu")

    def init_context(self, index: int) -> None:
        self._driver.calls.append(("init_context", index))
        self._driver.context = True

    def device_free_bytes(self, index: int) -> int:
        return self._driver.capacity - self._driver.allocated_bytes()

    def wait_queued(self, index: int) -> None:
        self._driver.calls.append(("wait_queued", index))
        self.waits += 1

    def wrap(self, base: int, nbytes: int, index: int, owner: object) -> torch.Tensor:
        self._driver.calls.append(("wrap", base, nbytes, index))
        buf = _OwnedBuffer(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)
        buf.owner = owner
        return torch.frombuffer(buf, dtype=torch.uint8)
