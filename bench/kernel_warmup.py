"""Compile the kernels a replay launches before its clock starts.

On CUDA a replay charges every arena operation its measured wall-clock time, so the first
shrink would also pay Triton's JIT compile and module load (1-6 s), which no serving engine
pays per request. :func:`warm_up_compaction` launches the compaction kernel once for each
specialisation a shrink of the arena can produce, on scratch buffers, so the replay's own
launches hit the JIT's in-memory cache.

Triton specialises an integer argument by class (equal to 1, divisible by 16, or other)
unless the kernel marks it ``do_not_specialize``, and pointers by 16-byte alignment, which
every torch allocation and the arena's buffer have. ``compact_blocks`` marks its sizes, so
today one specialisation serves every shrink of an arena; the warm-up still sizes its
scratch buffer and table in the arena's classes and launches 1, 2 and 16 moves, so that a
kernel change that specialises sizes again stays covered (a test checks, through Triton's
own binder, that every key a shrink can launch is one the warm-up launched).
"""
from __future__ import annotations

import time


def same_class(n: int, small: int) -> int:
    """A count in Triton's specialisation class of ``n`` (1; a multiple of 16; other),
    at least ``small`` where the class allows: 1, ``16 * ceil(small / 16)`` or the smallest
    odd count >= ``small`` that is not 1."""
    if n == 1:
        return 1
    if n % 16 == 0:
        return 16 * max(1, -(-small // 16))
    return max(3, small | 1)


def warm_up_compaction(arena) -> float:
    """Launch ``kernels.compact_blocks`` on scratch tensors shaped like ``arena``'s blocks
    (its ``spec.block_shape`` and dtype, on its device) with 1, 2 and 16 moves and a block
    table of the arena's size class, then synchronize. Returns the seconds spent (0.0 and
    nothing launched when the arena is not on CUDA). The arena itself is not touched."""
    if arena.device.type != "cuda":
        return 0.0
    return compaction_launches(arena.device, arena.spec, arena.capacity_blocks,
                               arena.tables.device_table.numel())


def compaction_launches(device, spec, capacity_blocks: int, table_numel: int) -> float:
    """The launches of :func:`warm_up_compaction` for an arena of ``capacity_blocks`` blocks
    of ``spec`` and a block table of ``table_numel`` int32 entries, on ``device`` (CUDA, or
    ``meta`` to inspect the launches without running them). Returns seconds spent."""
    import torch

    import kernels

    t0 = time.perf_counter()
    num_blocks = same_class(capacity_blocks, 32)
    blocks = torch.zeros((num_blocks, *spec.block_shape), dtype=spec.dtype, device=device)
    table = (torch.zeros(same_class(table_numel, 16), dtype=torch.int32, device=device)
             if table_numel else None)
    for moves in (1, 2, 16):
        if 2 * moves > num_blocks:
            continue
        # Two allocations, not two halves of one: a slice's pointer may lose the 16-byte
        # alignment the arena's freshly copied move lists have (another specialisation).
        src = torch.arange(moves, dtype=torch.int64, device=device)
        dst = torch.arange(moves, 2 * moves, dtype=torch.int64, device=device)
        kernels.compact_blocks(blocks, src, dst, table)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
