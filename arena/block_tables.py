"""Block tables: per-sequence lists of block ids on the host, mirrored in a device int32 table.

Kernels read the device table (``[max_seqs, max_blocks_per_seq]``, padding -1); compaction
rewrites it in place on the device and the host mirror with the same remap. Sequences are
opaque integer keys: the arena knows no requests.

Thread-safe: every method takes the owning arena's lock (see :mod:`arena._guard`); after the
arena is closed every method raises ``ArenaError("arena is closed")``.
"""
from __future__ import annotations

import numpy as np
import torch

from ._checks import as_block_ids, as_int
from ._guard import Guard, guarded

PAD = -1


def remap_block_ids(table: np.ndarray, src: np.ndarray, dst: np.ndarray,
                    num_blocks: int) -> None:
    """Rewrite ``table`` (an int32 numpy array of block ids, any shape) in place: every
    entry equal to ``src[k]`` becomes ``dst[k]``; entries outside ``[0, num_blocks)`` (the
    -1 padding) are left alone, as the compaction kernel does. ``src``/``dst``: int
    ``[m]``."""
    if src.size == 0:
        return
    remap = np.arange(num_blocks, dtype=table.dtype)
    remap[src] = dst
    valid = (table >= 0) & (table < num_blocks)
    table[valid] = remap[table[valid]]


class BlockTables:
    """Host table (numpy) + device mirror (torch int32) for up to ``max_seqs`` sequences,
    holding block ids in ``[0, num_blocks)``.

    On a CPU arena the device table is the host table's memory. ``separate_mirror=True``
    keeps a separate device copy even on the CPU, so tests exercise the GPU code path.
    ``guard``: the owning arena's lock and closed flag (a standalone table gets its own).
    """

    def __init__(self, max_seqs: int, max_blocks_per_seq: int, device: torch.device, *,
                 num_blocks: int | None = None, separate_mirror: bool = False,
                 guard: Guard | None = None):
        self.max_seqs = as_int(max_seqs, "max_seqs", minimum=1)
        self.max_blocks_per_seq = as_int(max_blocks_per_seq, "max_blocks_per_seq", minimum=1)
        self.num_blocks = (np.iinfo(np.int32).max if num_blocks is None
                           else as_int(num_blocks, "num_blocks", minimum=1))
        self._guard = Guard() if guard is None else guard
        self.device = torch.device(device)
        self.host = np.full((self.max_seqs, self.max_blocks_per_seq), PAD, dtype=np.int32)
        self.lengths = np.zeros(self.max_seqs, dtype=np.int64)
        self._rows: dict[int, int] = {}
        self._free_rows = list(range(self.max_seqs - 1, -1, -1))
        if self.device.type == "cpu" and not separate_mirror:
            # Same memory: the "device" table is the host table, always in sync.
            self._device = torch.from_numpy(self.host)
            self._dirty: set[int] | None = None
        else:
            self._device = torch.full((self.max_seqs, self.max_blocks_per_seq), PAD,
                                      dtype=torch.int32, device=self.device)
            self._dirty = set()

    @guarded
    def __contains__(self, seq_id) -> bool:
        return seq_id in self._rows

    @guarded
    def __len__(self) -> int:
        return len(self._rows)

    def _row_of(self, seq_id) -> int:
        try:
            return self._rows[seq_id]
        except KeyError:
            raise KeyError(f"seq_id {seq_id!r} has no block table") from None

    def _touch(self, row: int) -> None:
        if self._dirty is not None:
            self._dirty.add(row)

    @guarded
    def add(self, seq_id: int) -> int:
        """Register ``seq_id`` with an empty table; returns its row in :attr:`device_table`."""
        if seq_id in self._rows:
            raise ValueError(f"seq_id {seq_id!r} already has a block table")
        if not self._free_rows:
            raise ValueError(f"block tables are full: max_seqs={self.max_seqs}")
        row = self._free_rows.pop()
        self._rows[seq_id] = row
        return row

    @guarded
    def append(self, seq_id: int, block_ids) -> None:
        """Append ``block_ids`` (int array-like) to ``seq_id``'s table."""
        row = self._row_of(seq_id)
        ids = as_block_ids(block_ids, self.num_blocks, unique=False)
        n, start = ids.size, int(self.lengths[row])
        if start + n > self.max_blocks_per_seq:
            raise ValueError(f"block_ids would grow seq_id {seq_id!r} to {start + n} blocks, "
                             f"above max_blocks_per_seq={self.max_blocks_per_seq} (build the "
                             "arena with a larger max_model_len or max_blocks_per_seq)")
        self.host[row, start:start + n] = ids
        self.lengths[row] = start + n
        self._touch(row)

    @guarded
    def truncate(self, seq_id: int, num_blocks: int) -> np.ndarray:
        """Keep the first ``num_blocks`` entries; returns the ids dropped (int64)."""
        row = self._row_of(seq_id)
        length = int(self.lengths[row])
        num_blocks = as_int(num_blocks, "num_blocks")
        if not 0 <= num_blocks <= length:
            raise ValueError(f"num_blocks must be in [0, {length}], got {num_blocks}")
        dropped = self.host[row, num_blocks:length].astype(np.int64)
        self.host[row, num_blocks:length] = PAD
        self.lengths[row] = num_blocks
        self._touch(row)
        return dropped

    @guarded
    def blocks(self, seq_id: int) -> np.ndarray:
        """``seq_id``'s block ids now (int64 copy), after any compaction."""
        row = self._row_of(seq_id)
        return self.host[row, :self.lengths[row]].astype(np.int64)

    @guarded
    def remove(self, seq_id: int) -> np.ndarray:
        """Forget ``seq_id``; returns its block ids (the blocks themselves are not freed)."""
        ids = self.blocks(seq_id)
        row = self._rows.pop(seq_id)
        self.host[row, :] = PAD
        self.lengths[row] = 0
        self._touch(row)
        self._free_rows.append(row)
        return ids

    @guarded
    def row(self, seq_id: int) -> int:
        """Row of ``seq_id`` in :attr:`device_table`."""
        return self._row_of(seq_id)

    @guarded
    def rows(self, seq_ids) -> np.ndarray:
        """Rows of several sequences, int32 ``[len(seq_ids)]``."""
        return np.fromiter((self._row_of(s) for s in seq_ids), dtype=np.int32)

    @property
    @guarded
    def device_table(self) -> torch.Tensor:
        """Device int32 table ``[max_seqs, max_blocks_per_seq]``, synced from the host first
        (only rows changed since the last sync are copied)."""
        self.sync()
        return self._device

    @guarded
    def sync(self) -> None:
        """Copy host rows changed since the last sync to the device table."""
        if not self._dirty:
            return
        rows = np.fromiter(sorted(self._dirty), dtype=np.int64)
        idx = torch.from_numpy(rows).to(self.device, non_blocking=True)
        src = torch.from_numpy(self.host[rows]).to(self.device, non_blocking=True)
        self._device.index_copy_(0, idx, src)
        self._dirty.clear()

    @guarded
    def snapshot(self) -> tuple[np.ndarray, torch.Tensor | None]:
        """Copies of the host table and (when separate) the device table, for :meth:`restore`."""
        return self.host.copy(), None if self._dirty is None else self._device.clone()

    @guarded
    def restore(self, saved: tuple[np.ndarray, torch.Tensor | None]) -> None:
        """Put back a :meth:`snapshot` (both tables), e.g. after a failed compaction."""
        host, device = saved
        self.host[...] = host
        if device is not None:
            self._device.copy_(device)

    @guarded
    def remap_host(self, src: np.ndarray, dst: np.ndarray, num_blocks: int) -> None:
        """Apply the compaction remap (``src[k]`` -> ``dst[k]``) to the host mirror, exactly
        as the kernel treats the device table: entries outside ``[0, num_blocks)`` are left
        alone. Nothing to do when the host table is the device table (the kernel rewrote it)."""
        if src.size == 0 or self._dirty is None:
            return
        remap_block_ids(self.host, src, dst, num_blocks)
