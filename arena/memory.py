"""Device memory behind one small interface: reserve a range once, map and unmap chunks of it,
and view the whole range as one uint8 tensor whose address never changes.

Two backends share these semantics (and the bookkeeping in :class:`DeviceMemory`):

* :class:`HostMemory` — an anonymous private mmap. Mapping commits (checked against an
  optional simulated device limit); unmapping is ``madvise(MADV_DONTNEED)``, which really
  returns the pages (resident memory drops, and the range reads as zeros afterwards). This is
  what every arena test runs on.
* :class:`arena.cuda_memory.CudaMemory` — CUDA virtual memory management through
  cuda-bindings (imported lazily, only when that backend is built).

After :meth:`DeviceMemory.close` the physical memory is gone but the *reservation* (the
virtual range) lives until the last tensor view of it is garbage-collected, so a view kept
past close can never alias memory handed to someone else: on the host it reads zeros, on a
GPU an access through it is an illegal-address error (see :mod:`arena.cuda_memory`).

A backend is not thread-safe by itself: :class:`arena.PagedArena` serialises every call to it
under the arena's lock.
"""
from __future__ import annotations

import mmap
from abc import ABC, abstractmethod

import torch

from ._checks import as_int
from ._guard import ArenaClosed
from .errors import ArenaOutOfMemory, ChunkReleaseFailed

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python 3.11's mmap module lacks it
GPU_GRANULARITY = 2 << 20  # cuMemGetAllocationGranularity on current NVIDIA GPUs


class DeviceMemory(ABC):
    """A reserved virtual range; chunks of ``granularity``-multiple size are mapped in it.

    Offsets and sizes passed to :meth:`map`/:meth:`unmap` are multiples of ``granularity``.
    A chunk must be unmapped with exactly the ``(offset, nbytes)`` it was mapped with.
    Subclasses provide :meth:`_map_chunk`, :meth:`_unmap_chunk`, :meth:`_release` and,
    when unmapping must wait for queued device work, :meth:`_wait_for_device`.
    """

    device: torch.device
    granularity: int
    reserved_bytes: int
    limit_bytes: int | None

    def _setup(self, reserved_bytes: int, granularity: int, limit_bytes: int | None,
               chunks: dict | None = None) -> None:
        """Validate the sizes and start the chunk book: ``offset -> (nbytes, payload)``."""
        reserved_bytes = as_int(reserved_bytes, "reserved_bytes")
        if reserved_bytes <= 0 or reserved_bytes % granularity:
            raise ValueError(f"reserved_bytes must be a positive multiple of the granularity "
                             f"{granularity}, got {reserved_bytes}")
        if limit_bytes is not None:
            limit_bytes = as_int(limit_bytes, "limit_bytes", minimum=0)
        self.granularity = int(granularity)
        self.reserved_bytes = reserved_bytes
        self.limit_bytes = limit_bytes
        self._chunks: dict[int, tuple[int, object]] = {} if chunks is None else chunks
        self._mapped = 0
        self._closed = False

    # ------------------------------------------------------------------ what subclasses do
    @abstractmethod
    def _map_chunk(self, offset: int, nbytes: int) -> object:
        """Back ``[offset, offset + nbytes)``; returns what :meth:`_unmap_chunk` needs.
        Raises :class:`ArenaOutOfMemory` (nothing mapped) when the device is out of memory;
        any other failure must also leave nothing mapped."""

    @abstractmethod
    def _unmap_chunk(self, offset: int, nbytes: int, payload: object) -> None:
        """Return one chunk's memory (queued device work has already finished)."""

    def _wait_for_device(self) -> None:
        """Block until no queued kernel can still use the range (host work is synchronous)."""

    def _device_free_bytes(self) -> int:
        """Bytes the device itself could still supply (before the range and limit clamps)."""
        return self.reserved_bytes

    @abstractmethod
    def _release(self) -> None:
        """Drop this object's hold on the reservation (every chunk is already unmapped)."""

    # ------------------------------------------------------------------ the interface
    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ArenaClosed()

    @property
    def mapped_bytes(self) -> int:
        """Bytes currently mapped."""
        return self._mapped

    def is_mapped(self, offset: int) -> bool:
        """Whether a chunk starts at byte ``offset``."""
        return offset in self._chunks

    def free_bytes(self) -> int:
        """Bytes that could still be mapped now: the device's free memory, clamped to the
        unmapped rest of the range and to ``limit_bytes``."""
        self._check_open()
        return self._clamp(self._device_free_bytes())

    def _clamp(self, device_free: int) -> int:
        free = min(int(device_free), self.reserved_bytes - self._mapped)
        if self.limit_bytes is not None:
            free = min(free, max(0, self.limit_bytes - self._mapped))
        return free

    def map(self, offset: int, nbytes: int) -> None:
        """Back ``[offset, offset + nbytes)`` with memory. Raises :class:`ArenaOutOfMemory`
        (nothing mapped) when the range's limit or the device cannot supply it."""
        self._check_open()
        self._check_range(offset, nbytes)
        if offset in self._chunks:
            raise ValueError(f"a chunk is already mapped at offset {offset}")
        free = self._clamp(self.reserved_bytes)
        if nbytes > free:
            raise ArenaOutOfMemory(f"{type(self).__name__}: memory limit reached",
                                   requested_bytes=nbytes, free_bytes=free)
        payload = self._map_chunk(offset, nbytes)
        self._chunks[offset] = (nbytes, payload)
        self._mapped += nbytes

    def unmap(self, offset: int, nbytes: int) -> None:
        """Return the memory of a mapped chunk to the device, after every kernel already
        queued that may use it has finished."""
        self.unmap_many([(offset, nbytes)])

    def unmap_many(self, ranges: list[tuple[int, int]]) -> None:
        """Unmap several chunks ``[(offset, nbytes), ...]``, waiting for the device once for
        the whole batch. Every range is checked before anything is unmapped; if the device
        fails part-way, the chunks already unmapped are recorded as such."""
        self._check_open()
        for offset, nbytes in ranges:
            entry = self._chunks.get(offset)
            if entry is None or entry[0] != nbytes:
                raise ValueError(f"no chunk of {nbytes} bytes is mapped at offset {offset}")
        if not ranges:
            return
        self._wait_for_device()
        for offset, nbytes in ranges:
            try:
                self._unmap_chunk(offset, nbytes, self._chunks[offset][1])
            except ChunkReleaseFailed:
                # The range is unmapped already: the books must say so before re-raising.
                del self._chunks[offset]
                self._mapped -= nbytes
                raise
            del self._chunks[offset]
            self._mapped -= nbytes

    def tensor(self) -> torch.Tensor:
        """The whole range as a uint8 tensor ``[reserved_bytes]``; same address for life."""
        self._check_open()
        return self._view

    def close(self) -> None:
        """Unmap every chunk and drop this object's hold on the reservation; idempotent.
        Tensor views handed out keep the (unbacked) reservation until they are collected."""
        if self._closed:
            return
        self.unmap_many([(offset, nbytes) for offset, (nbytes, _) in self._chunks.items()])
        self._view = None
        self._release()
        self._closed = True

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

    Close: every page is returned (``MADV_DONTNEED`` over the whole range) and the mmap
    object is dropped; ``torch.frombuffer`` views keep a reference to it, so the range stays
    reserved, reading zeros, until the last view is collected, and then goes.
    """

    def __init__(self, reserved_bytes: int, *, granularity: int = GPU_GRANULARITY,
                 limit_bytes: int | None = None):
        granularity = as_int(granularity, "granularity")
        if granularity <= 0 or granularity % mmap.PAGESIZE:
            raise ValueError(f"granularity must be a positive multiple of the page size "
                             f"{mmap.PAGESIZE}, got {granularity}")
        self._setup(reserved_bytes, granularity, limit_bytes)
        self.device = torch.device("cpu")
        self._mmap = mmap.mmap(-1, self.reserved_bytes,
                               flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
        self._view = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def _map_chunk(self, offset: int, nbytes: int) -> None:
        return None  # pages are committed on first touch; the limit was checked by map()

    def _unmap_chunk(self, offset: int, nbytes: int, payload: object) -> None:
        self._mmap.madvise(mmap.MADV_DONTNEED, offset, nbytes)

    def _release(self) -> None:
        # Writes through views into unmapped chunks commit pages too: return the whole range.
        self._mmap.madvise(mmap.MADV_DONTNEED, 0, self.reserved_bytes)
        # Never mmap.close(): torch.frombuffer holds no buffer export, so closing would pull
        # the pages from under a kept view (a segfault on its next read). Dropping the last
        # reference unmaps the range once no view refers to it.
        self._mmap = None
