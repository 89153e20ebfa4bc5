"""Device memory behind one small interface: reserve a range once, map and unmap chunks of it,
and view the whole range as one uint8 tensor whose address never changes.

Two backends share these semantics:

* :class:`HostMemory` — an anonymous private mmap. Mapping commits (checked against an
  optional simulated device limit); unmapping is ``madvise(MADV_DONTNEED)``, which really
  returns the pages (resident memory drops, and the range reads as zeros afterwards). This is
  what every arena test runs on.
* :class:`arena.cuda_memory.CudaMemory` — CUDA virtual memory management through
  cuda-bindings (imported lazily, only when that backend is built).
"""
from __future__ import annotations

import mmap
from abc import ABC, abstractmethod

import torch

from .errors import ArenaOutOfMemory

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.11's mmap module lacks it
GPU_GRANULARITY = 2 << 20  # cuMemGetAllocationGranularity on current NVIDIA GPUs


class DeviceMemory(ABC):
    """A reserved virtual range; chunks of ``granularity``-multiple size are mapped in it.

    Offsets and sizes passed to :meth:`map`/:meth:`unmap` are multiples of ``granularity``.
    A chunk must be unmapped with exactly the ``(offset, nbytes)`` it was mapped with.
    """

    device: torch.device
    granularity: int
    reserved_bytes: int

    @abstractmethod
    def map(self, offset: int, nbytes: int) -> None:
        """Back ``[offset, offset + nbytes)`` with memory. Raises :class:`ArenaOutOfMemory`
        (nothing mapped) when the device cannot supply it."""

    @abstractmethod
    def unmap(self, offset: int, nbytes: int) -> None:
        """Return the memory of a mapped chunk to the device, after every kernel already
        queued that may use it has finished."""

    def unmap_many(self, ranges: list[tuple[int, int]]) -> None:
        """Unmap several chunks ``[(offset, nbytes), ...]``; backends that must wait for the
        device first wait once for the whole batch."""
        for offset, nbytes in ranges:
            self.unmap(offset, nbytes)

    @abstractmethod
    def free_bytes(self) -> int:
        """Bytes the device could still map now (never more than the unmapped reserve)."""

    @abstractmethod
    def tensor(self) -> torch.Tensor:
        """The whole range as a uint8 tensor ``[reserved_bytes]``; same address for life."""

    @property
    @abstractmethod
    def mapped_bytes(self) -> int:
        """Bytes currently mapped."""

    def close(self) -> None:
        """Unmap everything and give the reservation back."""

    def _check_range(self, offset: int, nbytes: int) -> None:
        g = self.granularity
        if offset < 0 or nbytes <= 0 or offset % g or nbytes % g:
            raise ValueError(f"offset {offset} and nbytes {nbytes} must be non-negative multiples "
                             f"of the granularity {g} (nbytes > 0)")
        if offset + nbytes > self.reserved_bytes:
            raise ValueError(f"range [{offset}, {offset + nbytes}) exceeds the reserved "
                             f"{self.reserved_bytes} bytes")


class HostMemory(DeviceMemory):
    """The host twin of GPU virtual memory: an anonymous ``MAP_PRIVATE | MAP_NORESERVE`` mmap.

    ``limit_bytes`` simulates the device's memory: mapping beyond it raises
    :class:`ArenaOutOfMemory`. ``granularity`` defaults to the GPU's 2 MiB so chunk counts
    match a GPU run; tests pass the page size for small arenas.
    """

    def __init__(self, reserved_bytes: int, *, granularity: int = GPU_GRANULARITY,
                 limit_bytes: int | None = None):
        if granularity <= 0 or granularity % mmap.PAGESIZE:
            raise ValueError(f"granularity must be a positive multiple of the page size "
                             f"{mmap.PAGESIZE}, got {granularity}")
        if reserved_bytes <= 0 or reserved_bytes % granularity:
            raise ValueError(f"reserved_bytes must be a positive multiple of granularity "
                             f"{granularity}, got {reserved_bytes}")
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
        self.device = torch.device("cpu")
        self.granularity = int(granularity)
        self.reserved_bytes = int(reserved_bytes)
        self.limit_bytes = None if limit_bytes is None else int(limit_bytes)
        self._mmap = mmap.mmap(-1, self.reserved_bytes,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self._view = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self._chunks: dict[int, int] = {}
        self._mapped = 0

    @property
    def mapped_bytes(self) -> int:
        return self._mapped

    def free_bytes(self) -> int:
        free = self.reserved_bytes - self._mapped
        if self.limit_bytes is not None:
            free = min(free, max(0, self.limit_bytes - self._mapped))
        return free

    def map(self, offset: int, nbytes: int) -> None:
        self._check_range(offset, nbytes)
        if offset in self._chunks:
            raise ValueError(f"a chunk is already mapped at offset {offset}")
        free = self.free_bytes()
        if nbytes > free:
            raise ArenaOutOfMemory("host backend: simulated device memory exhausted",
                                   requested_bytes=nbytes, free_bytes=free)
        self._chunks[offset] = nbytes
        self._mapped += nbytes

    def unmap(self, offset: int, nbytes: int) -> None:
        if self._chunks.get(offset) != nbytes:
            raise ValueError(f"no chunk of {nbytes} bytes is mapped at offset {offset}")
        # Host work is synchronous, so nothing queued can still be reading the range.
        self._mmap.madvise(mmap.MADV_DONTNEED, offset, nbytes)
        del self._chunks[offset]
        self._mapped -= nbytes

    def tensor(self) -> torch.Tensor:
        return self._view

    def close(self) -> None:
        if self._mmap is None:
            return
        self.unmap_many(list(self._chunks.items()))
        self._view = None
        try:
            self._mmap.close()
        except BufferError:
            # A caller still holds a view; the pages are already released, the range goes
            # when the last view does.
            pass
        self._mmap = None
