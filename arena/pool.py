"""Pool: a named lease of blocks over the one arena (e.g. "prefill" and "decode").

A pool holds at most ``lease`` blocks. Its lease is backed by mapped memory (the arena keeps
``sum of leases <= mapped blocks``), so :meth:`allocate` never maps and never fails for lack
of memory, only for lack of lease. All state lives in the arena; a pool is a handle, and
every method runs under the arena's lock (thread-safe; ``ArenaError("arena is closed")``
after :meth:`PagedArena.close`). ``lease`` and ``num_owned`` are plain attributes: read
them under ``arena.lock`` when other threads may change them.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class LeaseBook(Protocol):
    """What a pool needs from the arena that keeps its books (``PagedArena``). A protocol,
    not an import, so that ``pool`` and ``paged_arena`` do not import each other."""

    def _owned_by(self, index: int) -> np.ndarray: ...
    def _resize(self, pool: "Pool", target_blocks: int) -> None: ...
    def _allocate(self, pool: "Pool", n: int) -> np.ndarray: ...
    def _free(self, pool: "Pool", block_ids) -> None: ...
    def _transfer(self, pool: "Pool", block_ids, other: "Pool") -> None: ...


class Pool:
    """A lease of blocks. Create through :meth:`PagedArena.pool`."""

    def __init__(self, arena: LeaseBook, name: str, index: int):
        self._arena = arena
        self.name = name
        self.index = index
        self.lease = 0
        self.num_owned = 0

    def __repr__(self) -> str:
        return f"Pool({self.name!r}, lease={self.lease}, owned={self.num_owned})"

    @property
    def arena(self) -> LeaseBook:
        """The arena this pool leases from."""
        return self._arena

    def owned(self) -> np.ndarray:
        """Sorted int64 ids of the blocks this pool holds now (after any compaction)."""
        return self._arena._owned_by(self.index)

    def resize(self, target_blocks: int) -> None:
        """Set the lease to ``target_blocks``, mapping chunks if the arena must grow.

        Raises ValueError when ``target_blocks`` is below the blocks the pool holds, and
        :class:`ArenaOutOfMemory` (nothing changed) when the device cannot supply it. A
        smaller lease maps nothing away by itself: :meth:`PagedArena.shrink` does that.
        """
        self._arena._resize(self, target_blocks)

    def allocate(self, n: int) -> np.ndarray:
        """Take the ``n`` lowest free mapped blocks; returns their int64 ids.

        Raises :class:`LeaseExceeded` if ``num_owned + n`` would exceed the lease.
        """
        return self._arena._allocate(self, n)

    def free(self, block_ids) -> None:
        """Give blocks back. Nothing changes on an error: :class:`ArenaError` if any id is not
        owned by this pool; ValueError/TypeError if an id is repeated, out of range or not an
        integer."""
        self._arena._free(self, block_ids)

    def transfer(self, block_ids, other: "Pool") -> None:
        """Hand blocks (and as many blocks of lease) to ``other``: no byte is copied. Errors
        as :meth:`free`; nothing changes on an error."""
        self._arena._transfer(self, block_ids, other)
