"""Block compaction: move whole blocks inside the arena and rewrite block tables, one launch.

The arena's buffer is block-major, so a block is one contiguous run of bytes. The kernel
views the buffer as 32-bit words (bytes when a block's size is not a multiple of 4) and
gives each (move, tile) pair one program; the programs past the moves rewrite the block
table through a remap vector (``remap[b]`` = new id of block b), so readers of the table
see new ids exactly when the data has moved — both happen in the same kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._checks import INDEX_DTYPES, check_tensor, host_values
from ._runtime import use_triton

_COPY_TILE = 2048  # words per program: 8 KiB, several 16-byte vectors per thread
_TABLE_TILE = 1024


@triton.jit
def _compact_kernel(words_ptr, src_ptr, dst_ptr, table_ptr, remap_ptr,
                    num_moves, words_per_block, tiles_per_block, table_numel, num_blocks,
                    COPY_TILE: tl.constexpr, TABLE_TILE: tl.constexpr):
    pid = tl.program_id(0)
    copy_programs = num_moves * tiles_per_block
    if pid < copy_programs:
        move = pid // tiles_per_block
        tile = pid % tiles_per_block
        src = tl.load(src_ptr + move).to(tl.int64)
        dst = tl.load(dst_ptr + move).to(tl.int64)
        # Ids are checked on the host for CPU tensors only; on CUDA a bad move copies nothing.
        ok = (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
        limit = tl.where(ok, words_per_block, 0)
        offs = tile.to(tl.int64) * COPY_TILE + tl.arange(0, COPY_TILE)
        mask = offs < limit
        vals = tl.load(words_ptr + src * words_per_block + offs, mask=mask)
        tl.store(words_ptr + dst * words_per_block + offs, vals, mask=mask)
    else:
        tpid = pid - copy_programs
        offs = tpid.to(tl.int64) * TABLE_TILE + tl.arange(0, TABLE_TILE)
        mask = offs < table_numel
        entry = tl.load(table_ptr + offs, mask=mask, other=-1)
        valid = mask & (entry >= 0) & (entry < num_blocks)
        new = tl.load(remap_ptr + entry, mask=valid, other=0)
        tl.store(table_ptr + offs, new, mask=valid)


def _validate(blocks, src, dst, block_tables):
    check_tensor("blocks", blocks)
    if blocks.dim() < 1 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be [num_blocks, ...] with num_blocks >= 1, got {tuple(blocks.shape)}")
    if not blocks.is_contiguous():
        raise ValueError("blocks must be contiguous and block-major (the arena's buffer), "
                         f"got strides {blocks.stride()}")
    check_tensor("src", src, ndim=1, dtypes=INDEX_DTYPES, device=blocks.device)
    check_tensor("dst", dst, ndim=1, dtypes=INDEX_DTYPES, device=blocks.device)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same length, got {src.numel()} and {dst.numel()}")
    if block_tables is not None:
        check_tensor("block_tables", block_tables, dtypes=(torch.int32,), device=blocks.device)
        if not block_tables.is_contiguous():
            raise ValueError("block_tables must be contiguous (it is rewritten in place)")
    s, d = host_values(src), host_values(dst)
    if s is not None and d is not None and s.numel():
        n = blocks.shape[0]
        for name, t in (("src", s), ("dst", d)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"{name} holds block ids in [{lo}, {hi}] outside [0, {n})")
            if torch.unique(t).numel() != t.numel():
                raise ValueError(f"{name} repeats a block id")
        if torch.isin(s, d).any():
            raise ValueError("src and dst must be disjoint sets of block ids")


def compact_blocks(blocks: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                   block_tables: torch.Tensor | None = None) -> None:
    """Copy block ``src[k]`` -> ``dst[k]`` for every k, and remap ``block_tables`` in place.

    blocks: the arena's block-major buffer ``[num_blocks, ...]`` (any dtype), each block one
    contiguous run. src, dst: int32/int64 ``[num_moves]``, on blocks' device; the two sets
    disjoint, neither with repeats (checked when the values are on the host). block_tables:
    optional contiguous int32 tensor of any shape on the same device; every entry equal to
    ``src[k]`` becomes ``dst[k]``, other entries (including negative padding) are untouched.
    Asynchronous on CUDA: no host sync.
    """
    _validate(blocks, src, dst, block_tables)
    num_moves = src.numel()
    if num_moves == 0:
        return
    if not use_triton(blocks):
        reference.compact_blocks_ref(blocks, src, dst, block_tables)
        return
    num_blocks = blocks.shape[0]
    block_bytes = blocks[0].numel() * blocks.element_size()
    flat = blocks.view(-1)
    if block_bytes % 4 == 0:
        words = flat.view(torch.uint8).view(torch.int32)
        words_per_block = block_bytes // 4
    else:
        words = flat.view(torch.uint8)
        words_per_block = block_bytes
    tiles_per_block = triton.cdiv(words_per_block, _COPY_TILE)
    if block_tables is not None and block_tables.numel():
        table = block_tables.view(-1)
        # Built with small async ops; the kernel then reads it while rewriting the table.
        # Slot num_blocks is a sink for moves with bad ids (possible only on CUDA, where
        # values are not checked), so they can neither fault nor remap anything.
        s, d = src.long(), dst.long()
        ok = (s >= 0) & (s < num_blocks) & (d >= 0) & (d < num_blocks)
        remap = torch.arange(num_blocks + 1, dtype=torch.int32, device=blocks.device)
        remap[torch.where(ok, s, num_blocks)] = torch.where(ok, d, num_blocks).to(torch.int32)
        table_programs = triton.cdiv(table.numel(), _TABLE_TILE)
    else:
        table = remap = torch.empty(1, dtype=torch.int32, device=blocks.device)
        table_programs = 0
    grid = (num_moves * tiles_per_block + table_programs,)
    _compact_kernel[grid](words, src, dst, table, remap, num_moves, words_per_block,
                          tiles_per_block, table.numel() if table_programs else 0, num_blocks,
                          COPY_TILE=_COPY_TILE, TABLE_TILE=_TABLE_TILE)
