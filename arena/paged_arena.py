"""PagedArena: one reserved range of device memory, mapped and returned chunk by chunk,
cut into KV blocks that named pools lease, with compaction so the top can be handed back.

Layout is block-major: ``blocks[num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim]``, so moving, swapping or releasing a block is one contiguous copy. A chunk holds a
whole number of blocks and is a multiple of the device granularity. Allocation takes the
lowest free block, so the top of the arena empties first.

Invariants (checked by the property tests):
* every block is owned by at most one pool; owned blocks lie in mapped chunks;
* each pool owns at most its lease; the sum of leases is at most the mapped blocks;
* mapped bytes = mapped chunks x chunk bytes;
* chunk 0 is mapped whenever any chunk is (every kernel's base pointer lies in it).

Threads: one re-entrant lock per arena (:attr:`PagedArena.lock`) guards all arena, pool and
block-table state; every public method takes it (see :mod:`arena._guard`).
"""
from __future__ import annotations

import heapq
import math
import time
from typing import Callable

import numpy as np
import torch

from ._checks import as_block_ids, as_int
from ._guard import Guard, guarded
from .block_tables import BlockTables
from .errors import ArenaError, ArenaOutOfMemory, LeaseExceeded
from .memory import GPU_GRANULARITY, DeviceMemory, HostMemory
from .pool import Pool
from .spec import KVSpec

FREE = -1
DEFAULT_MAX_MODEL_LEN = 32768  # tokens: the default block-table width is this many tokens' blocks


class PagedArena:
    """A paged KV-cache arena over ``max_bytes`` of reserved device address space.

    Args:
        spec: the KV geometry.
        max_bytes: size of the reserved range (rounded down to whole chunks). Nothing is
            mapped at construction.
        device: "cpu" (host mmap backend) or "cuda"/"cuda:N" (CUDA virtual memory).
        device_limit_bytes: at most this many bytes are ever mapped (the device's share for
            KV; on the host backend it simulates the device's memory).
        max_seqs: rows of the block tables (sequences registered at once).
        max_model_len: longest sequence in tokens; the block tables get
            ``ceil(max_model_len / block_size)`` columns (at most one per block of the arena).
            Default :data:`DEFAULT_MAX_MODEL_LEN`. Appending past it raises ValueError.
        max_blocks_per_seq: the table width in blocks, instead of ``max_model_len``.
        granularity: host backend only; chunk granularity in bytes (default 2 MiB, as GPUs).
        chunk_bytes: chunk size; default the smallest granularity multiple holding whole blocks.
        backend: a ready :class:`DeviceMemory` (tests inject failures or a fake driver this way).
        compact_fn: the compaction kernel, ``(blocks, src, dst, block_tables) -> None``;
            default :func:`kernels.compact_blocks`.
        swap_copies: False for simulations whose blocks hold nothing worth keeping (a host
            replay's step model writes no KV): :meth:`swap_out` then returns a zero-copy
            view of the right shape and :meth:`swap_in` checks it and copies nothing, so a
            swap-heavy simulation does not hold its swapped KV in host memory. Default True.

    Threads: every public method (and those of its pools and tables) takes :attr:`lock`, so
    threads may share one arena; hold :attr:`lock` yourself to make several calls atomic.
    Closing: after :meth:`close` every method raises ``ArenaError("arena is closed")``; views
    handed out before stay harmless on the host (they read zeros); on CUDA they must not be
    used (see :mod:`arena.cuda_memory`).
    """

    def __init__(self, spec: KVSpec, max_bytes: int, device: str | torch.device = "cpu", *,
                 device_limit_bytes: int | None = None, max_seqs: int = 256,
                 max_model_len: int | None = None, max_blocks_per_seq: int | None = None,
                 granularity: int | None = None, chunk_bytes: int | None = None,
                 backend: DeviceMemory | None = None, compact_fn: Callable | None = None,
                 swap_copies: bool = True):
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec must be a KVSpec, got {type(spec).__name__}")
        max_bytes = as_int(max_bytes, "max_bytes")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        max_seqs = as_int(max_seqs, "max_seqs", minimum=1)
        width = self._table_width(spec, max_model_len, max_blocks_per_seq)
        if device_limit_bytes is not None:
            device_limit_bytes = as_int(device_limit_bytes, "device_limit_bytes", minimum=0)
        self.spec = spec
        self._guard = Guard()
        if backend is not None:
            if not isinstance(backend, DeviceMemory):
                raise TypeError(f"backend must be a DeviceMemory, got {type(backend).__name__}")
            dev, gran = backend.device, backend.granularity
        else:
            dev = self._parse_device(device)
            if dev.type == "cuda":
                from .cuda_memory import CudaRuntime, allocation_granularity
                runtime = CudaRuntime()
                dev = torch.device("cuda", runtime.resolve(dev))
                gran = allocation_granularity(dev.index, runtime)
            else:
                gran = GPU_GRANULARITY if granularity is None else as_int(granularity,
                                                                          "granularity")
                if gran <= 0:
                    raise ValueError(f"granularity must be a positive multiple of the page "
                                     f"size, got {gran}")
        if chunk_bytes is None:
            chunk_bytes = spec.chunk_bytes_for(gran)
        else:
            chunk_bytes = as_int(chunk_bytes, "chunk_bytes")
            if chunk_bytes <= 0 or chunk_bytes % gran or chunk_bytes % spec.block_bytes:
                raise ValueError(f"chunk_bytes must be a positive multiple of both the "
                                 f"granularity {gran} and the block size {spec.block_bytes} B, "
                                 f"got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        self.blocks_per_chunk = self.chunk_bytes // spec.block_bytes
        self.num_chunks = max_bytes // self.chunk_bytes
        if self.num_chunks < 1:
            raise ValueError(f"max_bytes={max_bytes} is smaller than one chunk "
                             f"({self.chunk_bytes} B)")
        self.capacity_blocks = self.num_chunks * self.blocks_per_chunk
        reserved = self.num_chunks * self.chunk_bytes
        if backend is None:
            if dev.type == "cuda":
                from .cuda_memory import CudaMemory
                backend = CudaMemory(reserved, device=dev, limit_bytes=device_limit_bytes,
                                     runtime=runtime)
            else:
                backend = HostMemory(reserved, granularity=gran, limit_bytes=device_limit_bytes)
        elif backend.reserved_bytes < reserved:
            raise ValueError(f"backend reserves {backend.reserved_bytes} B, fewer than the "
                             f"{reserved} B this arena needs")
        self._mem = backend
        self.device = backend.device
        raw = backend.tensor()[:reserved]
        self._blocks = raw.view(spec.dtype).view(self.capacity_blocks, *spec.block_shape)
        if compact_fn is None:
            from kernels import compact_blocks as compact_fn
        self._compact = compact_fn
        self._swap_copies = bool(swap_copies)
        self.tables = BlockTables(max_seqs, min(width, self.capacity_blocks), self.device,
                                  num_blocks=self.capacity_blocks, guard=self._guard)

        self._owner = np.full(self.capacity_blocks, FREE, dtype=np.int16)
        self._chunk_mapped = np.zeros(self.num_chunks, dtype=bool)
        self._free_heap: list[int] = []  # candidate free blocks; validated when popped
        self._pools: dict[str, Pool] = {}
        self._leased = 0
        self._used = 0
        self._counters = dict(map_calls=0, unmap_calls=0, shrinks=0, moves=0, bytes_moved=0,
                              time_map_s=0.0, time_unmap_s=0.0, time_compact_s=0.0)

    @staticmethod
    def _parse_device(device) -> torch.device:
        try:
            dev = torch.device(device)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}") from exc
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
        return dev

    @staticmethod
    def _table_width(spec: KVSpec, max_model_len, max_blocks_per_seq) -> int:
        if max_blocks_per_seq is not None:
            if max_model_len is not None:
                raise ValueError("give max_model_len or max_blocks_per_seq, not both")
            return as_int(max_blocks_per_seq, "max_blocks_per_seq", minimum=1)
        tokens = DEFAULT_MAX_MODEL_LEN if max_model_len is None else as_int(
            max_model_len, "max_model_len", minimum=1)
        return spec.blocks_for(tokens)

    @property
    def lock(self):
        """The arena's re-entrant lock: hold it to make several calls atomic together."""
        return self._guard.lock

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._guard.closed

    @property
    @guarded
    def blocks(self) -> torch.Tensor:
        """Block-major buffer ``[capacity_blocks, num_layers, 2, block_size, num_kv_heads,
        head_dim]`` in ``spec.dtype``; its address is fixed for the arena's life."""
        return self._blocks

    # ------------------------------------------------------------------ views and numbers
    @guarded
    def kv_cache(self, layer: int) -> torch.Tensor:
        """One layer's strided view ``[capacity_blocks, 2, block_size, num_kv_heads,
        head_dim]`` for the kernels; its address is fixed for the arena's life."""
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.spec.num_layers:
            raise ValueError(f"layer must be in [0, {self.spec.num_layers}), got {layer!r}")
        return self._blocks[:, layer]

    @property
    @guarded
    def backend(self) -> DeviceMemory:
        """The device-memory backend (host mmap or CUDA VMM)."""
        return self._mem

    @property
    @guarded
    def mapped_chunks(self) -> int:
        return int(self._chunk_mapped.sum())

    @property
    @guarded
    def mapped_blocks(self) -> int:
        return self.mapped_chunks * self.blocks_per_chunk

    @property
    @guarded
    def mapped_bytes(self) -> int:
        return self._mem.mapped_bytes

    @property
    @guarded
    def leased_blocks(self) -> int:
        """Sum of every pool's lease, in blocks."""
        return self._leased

    @property
    @guarded
    def used_blocks(self) -> int:
        """Blocks owned by pools (live KV), in blocks."""
        return self._used

    @guarded
    def available_blocks(self) -> int:
        """Blocks that could still be leased now: mapped but unleased, plus what the device
        can still map. No side effects."""
        unmapped = self.num_chunks - self.mapped_chunks
        mappable = min(unmapped, self._mem.free_bytes() // self.chunk_bytes)
        return self.mapped_blocks - self._leased + mappable * self.blocks_per_chunk

    @guarded
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
    @guarded
    def pools(self) -> dict[str, Pool]:
        """Every pool by name."""
        return dict(self._pools)

    @guarded
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
        try:
            # Highest first: if the device fails part-way, what stays mapped is still a run
            # from the bottom, so chunk 0 (every kernel's base pointer) is the last to go.
            self._mem.unmap_many([(c * self.chunk_bytes, self.chunk_bytes)
                                  for c in sorted(chunks.tolist(), reverse=True)])
        finally:
            # On a device error part-way, record exactly the chunks the backend did unmap.
            gone = chunks[[not self._mem.is_mapped(c * self.chunk_bytes) for c in chunks.tolist()]]
            self._chunk_mapped[gone] = False
            self._counters["unmap_calls"] += int(gone.size)
            self._counters["time_unmap_s"] += time.perf_counter() - t0
        if len(self._free_heap) > 4 * self.capacity_blocks:
            self._rebuild_heap()

    def _rebuild_heap(self, exclude=()) -> None:
        """The heap from scratch: every free block of a mapped chunk, except ``exclude``."""
        free = np.repeat(self._chunk_mapped, self.blocks_per_chunk) & (self._owner == FREE)
        free[list(exclude)] = False
        self._free_heap[:] = np.flatnonzero(free).tolist()
        heapq.heapify(self._free_heap)

    # ------------------------------------------------------------------ pool operations
    def _check_pool(self, pool: Pool, name: str = "pool") -> None:
        if not isinstance(pool, Pool) or self._pools.get(pool.name) is not pool:
            raise ValueError(f"{name} is not a pool of this arena")

    def _ids(self, block_ids, name: str = "block_ids") -> np.ndarray:
        return as_block_ids(block_ids, self.capacity_blocks, name)

    @guarded
    def _owned_by(self, index: int) -> np.ndarray:
        return np.flatnonzero(self._owner == index).astype(np.int64)

    @guarded
    def _resize(self, pool: Pool, target_blocks: int) -> None:
        target = as_int(target_blocks, "target_blocks", minimum=0)
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

    @guarded
    def _allocate(self, pool: Pool, n: int) -> np.ndarray:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        n = int(n)
        if pool.num_owned + n > pool.lease:
            raise LeaseExceeded(f"pool {pool.name!r}: allocating {n} blocks would hold "
                                f"{pool.num_owned + n}, above its lease of {pool.lease}")
        # Two phases: pick the blocks, then claim them all at once, so that an error part-way
        # (even an interrupt) claims nothing.
        bpc, heap, owner, mapped = self.blocks_per_chunk, self._free_heap, self._owner, self._chunk_mapped
        picked: list[int] = []
        try:
            while len(picked) < n:
                if not heap:  # cannot happen while leases <= mapped; rebuild to be sure
                    self._rebuild_heap(exclude=picked)
                    if not heap:
                        raise ArenaError("no free mapped block although the lease allows one")
                    continue
                b = heapq.heappop(heap)
                if owner[b] == FREE and mapped[b // bpc] and (not picked or b != picked[-1]):
                    picked.append(b)
        except BaseException:
            for b in picked:
                heapq.heappush(heap, b)
            raise
        out = np.array(picked, dtype=np.int64)
        owner[out] = pool.index
        pool.num_owned += n
        self._used += n
        return out

    @guarded
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

    @guarded
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
    @guarded
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

    @guarded
    def shrink(self, unmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Compact on the device and unmap every chunk the leases no longer need (with
        ``unmap=False`` those chunks are only emptied, for :meth:`release_free_chunks` to
        give back later, e.g. from a background thread).

        Live blocks above the new top move to the lowest free blocks below it (the kernel
        copies them and rewrites the device block table in the same launch; the host mirror
        and pool ownership follow). Returns the moves as int64 arrays: block ``src[k]`` now
        lives at ``dst[k]``. Lower leases first (``Pool.resize``) to give memory back.

        It moves blocks of every pool: block ids held outside the block tables are stale
        afterwards (apply the returned moves, or re-read ``Pool.owned()``/``tables.blocks()``).
        With several threads, hold :attr:`lock` from ``allocate`` until the ids are in a table.
        All or nothing if the compaction kernel fails (tables restored, nothing moved); if the
        device then fails to unmap, the moves stand, the books record exactly the chunks that
        went, and the exception carries ``moves = (src, dst)``.
        """
        src, dst, drop = self.plan_shrink()
        if src.size:
            self._compact_moves(src, dst)
        if drop.size and unmap:
            try:
                self._unmap_chunks(drop)
            except BaseException as exc:
                # The moves stand (ownership and tables already follow them); say so.
                self._rebuild_heap()
                exc.moves = (src, dst)
                raise
        if drop.size or src.size:
            self._rebuild_heap()
        self._counters["shrinks"] += 1
        return src, dst

    def _compact_moves(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Run the compaction kernel for ``src -> dst``, then move ownership and the host
        mirror. All or nothing: if the kernel fails (even after rewriting the block table),
        the tables are put back; block contents need no undo, since ``src`` is only read and
        ``dst`` blocks were free."""
        t0 = time.perf_counter()
        table = self.tables.device_table
        saved = self.tables.snapshot()
        try:
            self._compact(self._blocks, torch.from_numpy(src).to(self.device),
                          torch.from_numpy(dst).to(self.device), table)
            if self.device.type == "cuda":
                # Errors surface here, and the timing is honest. Only this stream: a
                # device-wide sync would also wait on (and break) another thread's graph
                # capture on another stream.
                torch.cuda.current_stream(self.device).synchronize()
        except BaseException:
            self.tables.restore(saved)
            raise
        self.tables.remap_host(src, dst, self.capacity_blocks)
        self._owner[dst] = self._owner[src]
        self._owner[src] = FREE
        self._counters["time_compact_s"] += time.perf_counter() - t0
        self._counters["moves"] += int(src.size)
        self._counters["bytes_moved"] += int(src.size) * self.spec.block_bytes

    @property
    @guarded
    def spare_blocks(self) -> int:
        """Mapped blocks no lease covers: what a lease can grow into without mapping."""
        return self.mapped_blocks - self._leased

    @guarded
    def map_spare(self, spare_blocks: int, max_chunks: int | None = None) -> int:
        """Map ahead of need: map the lowest unmapped chunks until at least ``spare_blocks``
        mapped blocks lie outside every lease (:attr:`spare_blocks`), or as close to that as
        the reserved range, the device and ``max_chunks`` (chunks mapped by this call; None:
        no limit) allow. No lease changes. Returns the chunks mapped (0 if the device
        refuses; all or nothing per call).

        A lease raised later takes these blocks without a driver call, so a background
        thread can pay the mapping off the critical path (see :mod:`arena.mapper`)."""
        spare_blocks = as_int(spare_blocks, "spare_blocks", minimum=0)
        if max_chunks is not None:
            max_chunks = as_int(max_chunks, "max_chunks", minimum=0)
        short = spare_blocks - self.spare_blocks
        if short <= 0:
            return 0
        n = min(math.ceil(short / self.blocks_per_chunk), self.num_chunks - self.mapped_chunks,
                self._mem.free_bytes() // self.chunk_bytes)
        if max_chunks is not None:
            n = min(n, max_chunks)
        if n <= 0:
            return 0
        try:
            self._map_chunks(n)
        except ArenaOutOfMemory:
            return 0   # the device gave less than it said: nothing mapped, try again later
        return n

    @guarded
    def release_free_chunks(self, keep_blocks: int = 0, max_chunks: int | None = None) -> int:
        """Unmap chunks that hold no owned block, highest first, without moving anything,
        while the mapped blocks still cover the leases plus ``keep_blocks`` spare blocks
        (kept mapped for what comes next); at most ``max_chunks`` of them (None: no limit).
        Returns how many were unmapped.

        Chunk 0 stays mapped while any other chunk is: every kernel's base pointer
        (``kv_cache(layer)``, ``blocks``) lies in it, and Triton's launcher refuses a pointer
        that no device memory maps."""
        keep_blocks = as_int(keep_blocks, "keep_blocks", minimum=0)
        if max_chunks is not None:
            max_chunks = as_int(max_chunks, "max_chunks", minimum=0)
        bpc = self.blocks_per_chunk
        spare = (self.spare_blocks - keep_blocks) // bpc
        if max_chunks is not None:
            spare = min(spare, max_chunks)
        if spare <= 0:
            return 0
        empty = self._chunk_mapped & ~(self._owner != FREE).reshape(self.num_chunks, bpc).any(axis=1)
        chunks = np.flatnonzero(empty)[::-1][:spare]
        if chunks.size and chunks[-1] == 0 and chunks.size < self.mapped_chunks:
            chunks = chunks[:-1]
        if chunks.size:
            self._unmap_chunks(np.sort(chunks))
        return int(chunks.size)

    # ------------------------------------------------------------------ swap
    @guarded
    def swap_out(self, block_ids) -> torch.Tensor:
        """A host copy of those blocks, ``[n, *spec.block_shape]`` in ``spec.dtype``
        (pinned memory on CUDA). The blocks stay owned: free them after."""
        ids = self._ids(block_ids)
        if ids.size and (self._owner[ids] == FREE).any():
            raise ArenaError("block_ids must all be owned blocks")
        if not self._swap_copies:
            # nothing worth copying: a zero-strided view of the right shape and dtype
            return torch.zeros((), dtype=self.spec.dtype).expand(ids.size, *self.spec.block_shape)
        index = torch.from_numpy(ids).to(self.device)
        data = self._blocks.index_select(0, index)
        if self.device.type == "cpu":
            return data
        host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
        host.copy_(data)
        return host

    @guarded
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
        if not self._swap_copies:
            return
        index = torch.from_numpy(ids).to(self.device)
        self._blocks.index_copy_(0, index, data.to(self.device, non_blocking=True))

    def close(self) -> None:
        """Unmap every chunk and mark the arena closed; idempotent.

        After this every method of the arena, its pools and its tables raises
        ``ArenaError("arena is closed")``. Views handed out before (``kv_cache()``,
        ``blocks``) keep the virtual range reserved until they are collected, so they never
        alias other memory: on the host they read zeros; on CUDA they must not be used (a
        kernel over them faults), so drop them before closing."""
        with self._guard.lock:
            if self._guard.closed:
                return
            # Close the memory first: if the device fails, the arena stays open and usable
            # (and close() can be called again) rather than closed with chunks still mapped.
            self._mem.close()
            self._guard.closed = True
            self._blocks = None
