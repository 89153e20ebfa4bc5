"""PagedArena: one reserved range of device memory, mapped and returned chunk by chunk,
cut into KV blocks that named pools lease, with compaction so the top can be handed back.

Layout is block-major: ``blocks[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]``, so moving, swapping or releasing a block is one contiguous copy. A chunk holds a
whole number of blocks and is a multiple of the device granularity. Allocation takes the
lowest free block, so the top of the arena empties first.

Invariants (checked by the property tests):
* every block is owned by at most one pool; owned blocks lie in mapped chunks;
* each pool owns at most its lease; the sum of leases is at most the mapped blocks;
* mapped bytes = mapped chunks x chunk bytes.
"""
from __future__ import annotations

import heapq
import math
import time
from typing import Callable

import numpy as np
import torch

from .block_tables import BlockTables
from .errors import ArenaError, ArenaOutOfMemory, LeaseExceeded
from .memory import GPU_GRANULARITY, DeviceMemory, HostMemory
from .pool import Pool
from .spec import KVSpec

FREE = -1


class PagedArena:
    """A paged KV-cache arena over ``max_bytes`` of reserved device address space.

    Args:
        spec: the KV geometry.
        max_bytes: size of the reserved range (rounded down to whole chunks). Nothing is
            mapped at construction.
        device: "cpu" (host mmap backend) or "cuda"/"cuda:N" (CUDA virtual memory).
        device_limit_bytes: at most this many bytes are ever mapped (the device's share for
            KV; on the host backend it simulates the device's memory).
        max_seqs, max_blocks_per_seq: block-table capacity (default width: every block).
        granularity: host backend only; chunk granularity in bytes (default 2 MiB, as GPUs).
        chunk_bytes: chunk size; default the smallest granularity multiple holding whole blocks.
        backend: a ready :class:`DeviceMemory` (tests inject failures this way).
        compact_fn: the compaction kernel, ``(blocks, src, dst, block_tables) -> None``;
            default :func:`kernels.compact_blocks`.
    """

    def __init__(self, spec: KVSpec, max_bytes: int, device: str | torch.device = "cpu", *,
                 device_limit_bytes: int | None = None, max_seqs: int = 256,
                 max_blocks_per_seq: int | None = None, granularity: int | None = None,
                 chunk_bytes: int | None = None, backend: DeviceMemory | None = None,
                 compact_fn: Callable | None = None):
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec must be a KVSpec, got {type(spec).__name__}")
        if not isinstance(max_bytes, (int, np.integer)) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.spec = spec
        dev = torch.device(device) if backend is None else backend.device
        if backend is not None:
            gran = backend.granularity
        elif dev.type == "cuda":
            from .cuda_memory import allocation_granularity
            gran = allocation_granularity(dev.index if dev.index is not None
                                          else torch.cuda.current_device())
        else:
            gran = GPU_GRANULARITY if granularity is None else int(granularity)
        if chunk_bytes is None:
            chunk_bytes = spec.chunk_bytes_for(gran)
        elif chunk_bytes <= 0 or chunk_bytes % gran or chunk_bytes % spec.block_bytes:
            raise ValueError(f"chunk_bytes must be a positive multiple of both the granularity "
                             f"{gran} and the block size {spec.block_bytes} B, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        self.blocks_per_chunk = self.chunk_bytes // spec.block_bytes
        self.num_chunks = int(max_bytes) // self.chunk_bytes
        if self.num_chunks < 1:
            raise ValueError(f"max_bytes={max_bytes} is smaller than one chunk "
                             f"({self.chunk_bytes} B)")
        self.capacity_blocks = self.num_chunks * self.blocks_per_chunk
        reserved = self.num_chunks * self.chunk_bytes
        if backend is None:
            if dev.type == "cuda":
                from .cuda_memory import CudaMemory
                backend = CudaMemory(reserved, device=dev, limit_bytes=device_limit_bytes)
            elif dev.type == "cpu":
                backend = HostMemory(reserved, granularity=gran, limit_bytes=device_limit_bytes)
            else:
                raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
        elif backend.reserved_bytes < reserved:
            raise ValueError(f"backend reserves {backend.reserved_bytes} B, fewer than the "
                             f"{reserved} B this arena needs")
        self._mem = backend
        self.device = backend.device
        raw = backend.tensor()[:reserved]
        self.blocks = raw.view(spec.dtype).view(self.capacity_blocks, *spec.block_shape)
        if compact_fn is None:
            from kernels import compact_blocks as compact_fn
        self._compact = compact_fn
        width = self.capacity_blocks if max_blocks_per_seq is None else int(max_blocks_per_seq)
        self.tables = BlockTables(max_seqs, width, self.device, num_blocks=self.capacity_blocks)

        self._owner = np.full(self.capacity_blocks, FREE, dtype=np.int16)
        self._chunk_mapped = np.zeros(self.num_chunks, dtype=bool)
        self._free_heap: list[int] = []  # candidate free blocks; validated when popped
        self._pools: dict[str, Pool] = {}
        self._leased = 0
        self._used = 0
        self._counters = dict(map_calls=0, unmap_calls=0, shrinks=0, moves=0, bytes_moved=0,
                              time_map_s=0.0, time_unmap_s=0.0, time_compact_s=0.0)

    # ------------------------------------------------------------------ views and numbers
    def kv_cache(self, layer: int) -> torch.Tensor:
        """One layer's strided view ``[capacity_blocks, 2, block_size, num_kv_heads,
        head_dim]`` for the kernels; its address is fixed for the arena's life."""
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.spec.num_layers:
            raise ValueError(f"layer must be in [0, {self.spec.num_layers}), got {layer!r}")
        return self.blocks[:, layer]

    @property
    def backend(self) -> DeviceMemory:
        """The device-memory backend (host mmap or CUDA VMM)."""
        return self._mem

    @property
    def mapped_chunks(self) -> int:
        return int(self._chunk_mapped.sum())

    @property
    def mapped_blocks(self) -> int:
        return self.mapped_chunks * self.blocks_per_chunk

    @property
    def mapped_bytes(self) -> int:
        return self._mem.mapped_bytes

    @property
    def leased_blocks(self) -> int:
        """Sum of every pool's lease, in blocks."""
        return self._leased

    @property
    def used_blocks(self) -> int:
        """Blocks owned by pools (live KV), in blocks."""
        return self._used

    def available_blocks(self) -> int:
        """Blocks that could still be leased now: mapped but unleased, plus what the device
        can still map. No side effects."""
        unmapped = self.num_chunks - self.mapped_chunks
        mappable = min(unmapped, self._mem.free_bytes() // self.chunk_bytes)
        return self.mapped_blocks - self._leased + mappable * self.blocks_per_chunk

    def pool(self, name: str) -> Pool:
        """The pool called ``name``, created (with a zero lease) on first use."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        pool = self._pools.get(name)
        if pool is None:
            if len(self._pools) >= np.iinfo(np.int16).max:
                raise ValueError("too many pools")
            pool = self._pools[name] = Pool(self, name, len(self._pools))
        return pool

    @property
    def pools(self) -> dict[str, Pool]:
        """Every pool by name."""
        return dict(self._pools)

    def stats(self) -> dict:
        """Mapped/leased/used blocks and bytes, chunk counts, per-pool leases, and counters:
        map_calls, unmap_calls, shrinks, moves, bytes_moved, time_map_s, time_unmap_s,
        time_compact_s (wall-clock seconds spent in those operations)."""
        bb = self.spec.block_bytes
        return dict(
            capacity_blocks=self.capacity_blocks, chunk_bytes=self.chunk_bytes,
            blocks_per_chunk=self.blocks_per_chunk, mapped_chunks=self.mapped_chunks,
            mapped_blocks=self.mapped_blocks, mapped_bytes=self.mapped_bytes,
            leased_blocks=self._leased, leased_bytes=self._leased * bb,
            used_blocks=self._used, used_bytes=self._used * bb,
            pools={n: dict(lease=p.lease, owned=p.num_owned) for n, p in self._pools.items()},
            **self._counters)

    # ------------------------------------------------------------------ mapping
    def _map_chunks(self, count: int) -> None:
        """Map the ``count`` lowest unmapped chunks, all or nothing."""
        if count <= 0:
            return
        candidates = np.flatnonzero(~self._chunk_mapped)[:count]
        if candidates.size < count:
            raise ArenaOutOfMemory("the arena's reserved range is full",
                                   requested_bytes=count * self.chunk_bytes,
                                   free_bytes=candidates.size * self.chunk_bytes)
        done: list[int] = []
        t0 = time.perf_counter()
        try:
            for c in candidates.tolist():
                self._mem.map(c * self.chunk_bytes, self.chunk_bytes)
                done.append(c)
        except BaseException as exc:
            # All or nothing: give back what this call mapped before re-raising.
            self._mem.unmap_many([(c * self.chunk_bytes, self.chunk_bytes) for c in done])
            if isinstance(exc, ArenaOutOfMemory):
                raise ArenaOutOfMemory("the device cannot supply the chunks asked for",
                                       requested_bytes=count * self.chunk_bytes,
                                       free_bytes=len(done) * self.chunk_bytes
                                       + exc.free_bytes) from exc
            raise
        finally:
            self._counters["time_map_s"] += time.perf_counter() - t0
        self._counters["map_calls"] += len(done)
        self._chunk_mapped[candidates] = True
        bpc = self.blocks_per_chunk
        for c in done:
            for b in range(c * bpc, (c + 1) * bpc):
                heapq.heappush(self._free_heap, b)

    def _unmap_chunks(self, chunks: np.ndarray) -> None:
        t0 = time.perf_counter()
        self._mem.unmap_many([(c * self.chunk_bytes, self.chunk_bytes) for c in chunks.tolist()])
        self._chunk_mapped[chunks] = False
        self._counters["unmap_calls"] += int(chunks.size)
        self._counters["time_unmap_s"] += time.perf_counter() - t0
        if len(self._free_heap) > 4 * self.capacity_blocks:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        mapped = np.repeat(self._chunk_mapped, self.blocks_per_chunk)
        self._free_heap = np.flatnonzero(mapped & (self._owner == FREE)).tolist()
        heapq.heapify(self._free_heap)

    # ------------------------------------------------------------------ pool operations
    def _check_pool(self, pool: Pool, name: str = "pool") -> None:
        if not isinstance(pool, Pool) or self._pools.get(pool.name) is not pool:
            raise ValueError(f"{name} is not a pool of this arena")

    def _ids(self, block_ids, name: str = "block_ids") -> np.ndarray:
        ids = np.asarray(block_ids)
        if ids.dtype == object or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
        ids = ids.astype(np.int64).reshape(-1)
        if ids.size:
            if ids.min() < 0 or ids.max() >= self.capacity_blocks:
                raise ValueError(f"{name} holds ids outside [0, {self.capacity_blocks})")
            if np.unique(ids).size != ids.size:
                raise ValueError(f"{name} repeats a block id")
        return ids

    def _owned_by(self, index: int) -> np.ndarray:
        return np.flatnonzero(self._owner == index).astype(np.int64)

    def _resize(self, pool: Pool, target_blocks: int) -> None:
        if isinstance(target_blocks, bool) or not isinstance(target_blocks, (int, np.integer)):
            raise TypeError(f"target_blocks must be an int, got {type(target_blocks).__name__}")
        target = int(target_blocks)
        if target < pool.num_owned:
            raise ValueError(f"target_blocks={target} is below the {pool.num_owned} blocks "
                             f"pool {pool.name!r} holds")
        new_leased = self._leased - pool.lease + target
        if new_leased > self.capacity_blocks:
            raise ArenaOutOfMemory(
                f"pool {pool.name!r}: leases would total {new_leased} blocks, above the arena's "
                f"capacity of {self.capacity_blocks}",
                requested_bytes=(new_leased - self.mapped_blocks) * self.spec.block_bytes,
                free_bytes=self.available_blocks() * self.spec.block_bytes)
        short = new_leased - self.mapped_blocks
        if short > 0:
            self._map_chunks(math.ceil(short / self.blocks_per_chunk))
        self._leased = new_leased
        pool.lease = target

    def _allocate(self, pool: Pool, n: int) -> np.ndarray:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        n = int(n)
        if pool.num_owned + n > pool.lease:
            raise LeaseExceeded(f"pool {pool.name!r}: allocating {n} blocks would hold "
                                f"{pool.num_owned + n}, above its lease of {pool.lease}")
        out = np.empty(n, dtype=np.int64)
        bpc, heap, owner, mapped = self.blocks_per_chunk, self._free_heap, self._owner, self._chunk_mapped
        got = 0
        while got < n:
            if not heap:  # cannot happen while leases <= mapped; rebuild to be sure
                self._rebuild_heap()
                if not heap:
                    raise ArenaError("no free mapped block although the lease allows one")
                continue
            b = heapq.heappop(heap)
            if owner[b] == FREE and mapped[b // bpc]:
                owner[b] = pool.index
                out[got] = b
                got += 1
        pool.num_owned += n
        self._used += n
        return out

    def _free(self, pool: Pool, block_ids) -> None:
        ids = self._ids(block_ids)
        if ids.size == 0:
            return
        foreign = ids[self._owner[ids] != pool.index]
        if foreign.size:
            state = "free" if self._owner[foreign[0]] == FREE else "owned by another pool"
            raise ArenaError(f"pool {pool.name!r} does not own block {int(foreign[0])} "
                             f"({state}); nothing was freed")
        self._owner[ids] = FREE
        pool.num_owned -= ids.size
        self._used -= ids.size
        for b in ids.tolist():
            heapq.heappush(self._free_heap, b)

    def _transfer(self, pool: Pool, block_ids, other: Pool) -> None:
        self._check_pool(other, "other")
        ids = self._ids(block_ids)
        foreign = ids[self._owner[ids] != pool.index]
        if foreign.size:
            raise ArenaError(f"pool {pool.name!r} does not own block {int(foreign[0])}; "
                             "nothing was transferred")
        if other is pool or ids.size == 0:
            return
        self._owner[ids] = other.index
        n = ids.size
        pool.num_owned -= n
        pool.lease -= n
        other.num_owned += n
        other.lease += n

    # ------------------------------------------------------------------ compaction
    def plan_shrink(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The moves and unmaps :meth:`shrink` would make, without making them.

        Keeps the lowest mapped chunks that cover the leases; every owned block outside them
        moves to the lowest free blocks inside. Returns ``(src, dst, chunks_to_unmap)``.
        """
        bpc = self.blocks_per_chunk
        keep_n = math.ceil(self._leased / bpc)
        mapped = np.flatnonzero(self._chunk_mapped)
        keep, drop = mapped[:keep_n], mapped[keep_n:]
        if drop.size == 0:
            return np.empty(0, np.int64), np.empty(0, np.int64), drop
        in_drop = np.zeros(self.num_chunks, dtype=bool)
        in_drop[drop] = True
        block_chunk = np.arange(self.capacity_blocks) // bpc
        live = self._owner != FREE
        src = np.flatnonzero(live & in_drop[block_chunk])
        in_keep = np.zeros(self.num_chunks, dtype=bool)
        in_keep[keep] = True
        dst = np.flatnonzero(~live & in_keep[block_chunk])[:src.size]
        assert dst.size == src.size, "leases cover the live blocks, so room must exist"
        return src.astype(np.int64), dst.astype(np.int64), drop

    def shrink(self) -> tuple[np.ndarray, np.ndarray]:
        """Compact on the device and unmap every chunk the leases no longer need.

        Live blocks above the new top move to the lowest free blocks below it (the kernel
        copies them and rewrites the device block table in the same launch; the host mirror
        and pool ownership follow). Returns the moves as int64 arrays: block ``src[k]`` now
        lives at ``dst[k]``. Lower leases first (``Pool.resize``) to give memory back.
        """
        src, dst, drop = self.plan_shrink()
        if src.size:
            t0 = time.perf_counter()
            table = self.tables.device_table
            self._compact(self.blocks, torch.from_numpy(src).to(self.device),
                          torch.from_numpy(dst).to(self.device), table)
            self.tables.remap_host(src, dst, self.capacity_blocks)
            self._owner[dst] = self._owner[src]
            self._owner[src] = FREE
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # honest timing; unmap would wait anyway
            self._counters["time_compact_s"] += time.perf_counter() - t0
            self._counters["moves"] += int(src.size)
            self._counters["bytes_moved"] += int(src.size) * self.spec.block_bytes
        if drop.size:
            self._unmap_chunks(drop)
        if drop.size or src.size:
            self._rebuild_heap()
        self._counters["shrinks"] += 1
        return src, dst

    def release_free_chunks(self) -> int:
        """Unmap chunks that hold no owned block, highest first, without moving anything,
        while the mapped blocks still cover the leases. Returns how many were unmapped."""
        bpc = self.blocks_per_chunk
        spare = (self.mapped_blocks - self._leased) // bpc
        if spare <= 0:
            return 0
        empty = self._chunk_mapped & ~(self._owner != FREE).reshape(self.num_chunks, bpc).any(axis=1)
        chunks = np.flatnonzero(empty)[::-1][:spare]
        if chunks.size:
            self._unmap_chunks(np.sort(chunks))
        return int(chunks.size)

    # ------------------------------------------------------------------ swap
    def swap_out(self, block_ids) -> torch.Tensor:
        """A host copy of those blocks, ``[n, *spec.block_shape]`` in ``spec.dtype``
        (pinned memory on CUDA). The blocks stay owned: free them after."""
        ids = self._ids(block_ids)
        if ids.size and (self._owner[ids] == FREE).any():
            raise ArenaError("block_ids must all be owned blocks")
        index = torch.from_numpy(ids).to(self.device)
        data = self.blocks.index_select(0, index)
        if self.device.type == "cpu":
            return data
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        host.copy_(data)
        return host

    def swap_in(self, data: torch.Tensor, block_ids) -> None:
        """Write a :meth:`swap_out` copy ``[n, *spec.block_shape]`` into owned ``block_ids``."""
        ids = self._ids(block_ids)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        if tuple(data.shape) != (ids.size, *self.spec.block_shape) or data.dtype != self.spec.dtype:
            raise ValueError(f"data must be {(ids.size, *self.spec.block_shape)} {self.spec.dtype}, "
                             f"got {tuple(data.shape)} {data.dtype}")
        if ids.size and (self._owner[ids] == FREE).any():
            raise ArenaError("block_ids must all be owned blocks")
        index = torch.from_numpy(ids).to(self.device)
        self.blocks.index_copy_(0, index, data.to(self.device, non_blocking=True))

    def close(self) -> None:
        """Unmap everything and release the reservation. The arena is unusable after."""
        self.blocks = None
        self.tables = None
        self._mem.close()
