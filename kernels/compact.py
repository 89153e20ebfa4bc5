"""Block compaction: move whole blocks inside the arena and rewrite block tables, one launch.

The arena's buffer is block-major, so a block is one contiguous run of bytes. The kernel
views the buffer as 32-bit words (bytes when a block's size is not a multiple of 4) and
gives each (move, tile) pair one program; the programs past the moves rewrite the block
table through a remap vector (``remap[b]`` = new id of block b), so readers of the table
see new ids exactly when the data has moved — both happen in the same kernel.

``src``, ``dst`` and the table are read through their strides (a column ``pairs[:, 0]``,
a ``[::2]`` view or an expanded tensor needs no copy). A table whose dimensions cannot be
folded into ``[rows, cols]`` with two strides (rare: e.g. a 3-D tensor sliced in two
inner dimensions) is rewritten through a contiguous copy that is written back — correct,
and captured by a CUDA graph like any two copies, but two extra passes over the table.

The public :func:`compact_blocks` validates, then calls the custom op
``kvarena::compact_blocks`` registered here (mutates ``blocks`` and ``block_tables``; the
fake does nothing), which launches without validating again.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _runtime, reference
from ._checks import INDEX_DTYPES, OP_NAMESPACE, check_no_overlap, check_tensor, host_values

_COPY_TILE = 2048  # words per program: 8 KiB, several 16-byte vectors per thread
_TABLE_TILE = 1024


@triton.jit
def _copy_block_tile(words_ptr, src_ptr, dst_ptr, s_src, s_dst, pid, words_per_block,
                     tiles_per_block, num_blocks, COPY_TILE: tl.constexpr):
    """Program ``pid`` copies tile ``pid % tiles_per_block`` of move ``pid // tiles_per_block``."""
    move = (pid // tiles_per_block).to(tl.int64)
    tile = pid % tiles_per_block
    src = tl.load(src_ptr + move * s_src).to(tl.int64)
    dst = tl.load(dst_ptr + move * s_dst).to(tl.int64)
    # Ids are checked on the host for CPU tensors only; on CUDA a bad move copies nothing.
    ok = (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
    limit = tl.where(ok, words_per_block, 0)
    offs = tile.to(tl.int64) * COPY_TILE + tl.arange(0, COPY_TILE)
    mask = offs < limit
    vals = tl.load(words_ptr + src * words_per_block + offs, mask=mask)
    tl.store(words_ptr + dst * words_per_block + offs, vals, mask=mask)


@triton.jit
def _remap_table_tile(table_ptr, remap_ptr, tpid, table_rows, table_cols, s_row, s_col,
                      num_blocks, TABLE_TILE: tl.constexpr):
    """Program ``tpid`` rewrites entries ``[tpid * TABLE_TILE, +TABLE_TILE)`` of the
    ``[table_rows, table_cols]`` table (row-major order) through ``remap``."""
    offs = tpid.to(tl.int64) * TABLE_TILE + tl.arange(0, TABLE_TILE)
    mask = offs < table_rows.to(tl.int64) * table_cols
    ptrs = table_ptr + (offs // table_cols) * s_row + (offs % table_cols) * s_col
    entry = tl.load(ptrs, mask=mask, other=-1)
    valid = mask & (entry >= 0) & (entry < num_blocks)
    new = tl.load(remap_ptr + entry, mask=valid, other=0)
    tl.store(ptrs, new, mask=valid)


# The two kinds of program live in helpers so that nothing assigned in one branch of the
# runtime `if` is assigned with another shape in the other: Triton's compiler unifies the
# types of variables assigned in both branches (the interpreter does not, and hid a
# mismatch here once). Sizes that only bound ranges are not specialised: one binary serves
# every number of moves, table size and arena size.
@triton.jit(do_not_specialize=["num_moves", "tiles_per_block", "table_rows", "table_cols",
                               "num_blocks"])
def _compact_kernel(words_ptr, src_ptr, dst_ptr, table_ptr, remap_ptr,
                    num_moves, words_per_block, tiles_per_block, table_rows, table_cols,
                    num_blocks, s_src, s_dst, s_row, s_col,
                    COPY_TILE: tl.constexpr, TABLE_TILE: tl.constexpr):
    pid = tl.program_id(0)
    copy_programs = num_moves * tiles_per_block
    if pid < copy_programs:
        _copy_block_tile(words_ptr, src_ptr, dst_ptr, s_src, s_dst, pid, words_per_block,
                         tiles_per_block, num_blocks, COPY_TILE)
    else:
        _remap_table_tile(table_ptr, remap_ptr, pid - copy_programs, table_rows, table_cols,
                          s_row, s_col, num_blocks, TABLE_TILE)


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
        check_no_overlap("block_tables", block_tables)
    s, d = host_values(src), host_values(dst)
    # Under torch.compile values are not readable while tracing; the kernel still ignores
    # moves with out-of-range ids, so skipping the check cannot cause an out-of-bounds access.
    if s is not None and d is not None and s.numel() and not torch.compiler.is_compiling():
        n = blocks.shape[0]
        for name, t in (("src", s), ("dst", d)):
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= n:
                raise ValueError(f"{name} holds block ids in [{lo}, {hi}] outside [0, {n})")
            if torch.unique(t).numel() != t.numel():
                raise ValueError(f"{name} repeats a block id")
        if torch.isin(s, d).any():
            raise ValueError("src and dst must be disjoint sets of block ids")


def _as_rows(table: torch.Tensor) -> torch.Tensor | None:
    """``table`` viewed as ``[rows, cols]`` without a copy, or None where its strides do not
    allow it (then the caller goes through a contiguous copy)."""
    if table.dim() == 0:
        return table.view(1, 1)
    if table.dim() == 1:
        return table.unsqueeze(0)
    try:
        return table.view(-1, table.shape[-1])
    except RuntimeError:  # leading dimensions that cannot be folded into one stride
        return None


def _launch(blocks, src, dst, table) -> None:
    """The kernel on validated arguments; ``table`` is None or a ``[rows, cols]`` view."""
    num_moves = src.numel()
    num_blocks = blocks.shape[0]
    block_bytes = blocks[0].numel() * blocks.element_size()
    flat = blocks.view(-1)
    # 32-bit words when both the block size and the buffer's start allow it, else bytes.
    if block_bytes % 4 == 0 and (flat.storage_offset() * flat.element_size()) % 4 == 0:
        words = flat.view(torch.uint8).view(torch.int32)
        words_per_block = block_bytes // 4
    else:
        words = flat.view(torch.uint8)
        words_per_block = block_bytes
    tiles_per_block = triton.cdiv(words_per_block, _COPY_TILE)
    if table is not None and table.numel():
        # Built with small async ops; the kernel then reads it while rewriting the table.
        # Slot num_blocks is a sink for moves with bad ids (possible only on CUDA, where
        # values are not checked), so they can neither fault nor remap anything.
        s, d = src.long(), dst.long()
        ok = (s >= 0) & (s < num_blocks) & (d >= 0) & (d < num_blocks)
        remap = torch.arange(num_blocks + 1, dtype=torch.int32, device=blocks.device)
        remap[torch.where(ok, s, num_blocks)] = torch.where(ok, d, num_blocks).to(torch.int32)
        rows, cols = table.shape
        s_row, s_col = table.stride()
        table_programs = triton.cdiv(table.numel(), _TABLE_TILE)
    else:
        table = remap = torch.empty(1, dtype=torch.int32, device=blocks.device)
        rows = cols = s_row = s_col = 0
        table_programs = 0
    grid = (num_moves * tiles_per_block + table_programs,)
    _compact_kernel[grid](words, src, dst, table, remap, num_moves, words_per_block,
                          tiles_per_block, rows, cols, num_blocks, src.stride(0), dst.stride(0),
                          s_row, s_col, COPY_TILE=_COPY_TILE, TABLE_TILE=_TABLE_TILE)


@torch.library.custom_op(f"{OP_NAMESPACE}::compact_blocks",
                         mutates_args=("blocks", "block_tables"))
def compact_blocks_op(blocks: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                      block_tables: Optional[torch.Tensor]) -> None:
    """``kvarena::compact_blocks``: the moves and the table rewrite on arguments
    :func:`compact_blocks` has validated (not checked again here). Triton where
    :func:`_runtime.use_triton` says so, else the torch reference."""
    if src.numel() == 0:
        return
    if not _runtime.use_triton(blocks):
        reference.compact_blocks_ref(blocks, src, dst, block_tables)
        return
    if block_tables is None:
        _launch(blocks, src, dst, None)
        return
    rows = _as_rows(block_tables)
    if rows is not None:
        _launch(blocks, src, dst, rows)
        return
    dense = block_tables.contiguous()
    _launch(blocks, src, dst, dense.view(-1, dense.shape[-1]))
    block_tables.copy_(dense)


@compact_blocks_op.register_fake
def _compact_blocks_fake(blocks, src, dst, block_tables) -> None:
    return None


def compact_blocks(blocks: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                   block_tables: torch.Tensor | None = None) -> None:
    """Copy block ``src[k]`` -> ``dst[k]`` for every k, and remap ``block_tables`` in place.

    blocks: the arena's block-major buffer ``[num_blocks, ...]`` (any dtype), each block one
    contiguous run. src, dst: int32/int64 ``[num_moves]``, on blocks' device, any stride
    (read in place); the two sets disjoint, neither with repeats (checked when the values
    are on the host). block_tables: optional int32 tensor of any shape and strides (not an
    expanded view: it is written) on the same device; every entry equal to ``src[k]``
    becomes ``dst[k]``, other entries (including negative padding) are untouched.
    Asynchronous on CUDA: no host sync. Goes through the ``kvarena::compact_blocks`` op.
    """
    _validate(blocks, src, dst, block_tables)
    if src.numel() == 0:
        return
    compact_blocks_op(blocks, src, dst, block_tables)
