"""Paged causal attention for prefill, chunked prefill and decode rows in one launch.

Flash-attention style: each program owns one tile of query rows of one sequence and one
KV head, keeps the online-softmax state (running max, running sum, output accumulator) in
float32, and walks the sequence's KV through its block table in tiles of ``BLOCK_N``
tokens, multiplying with ``tl.dot``.

Tile rows fold the query heads that share a KV head (GQA/MQA): row ``r`` of a tile is
query ``r // HEADS`` (relative to the tile) of head ``r % HEADS`` of the group, so every
K/V tile loaded from memory serves all those heads. Groups larger than ``HEADS`` are split
over the second grid axis; padded head slots (group sizes that are not powers of two) are
masked rows.

The grid comes from shapes only, so the launch needs no host sync and can be captured in
a CUDA graph: axis 0 has ``num_tokens // BLOCK_Q + num_seqs`` programs, enough for every
sequence's ``cdiv(q_i, BLOCK_Q)`` query tiles, because a sequence's tiles are numbered from
``query_start_loc[i] // BLOCK_Q + i``. A program finds its sequence by binary search over
that numbering and returns at once when it lies past the sequence's last tile. Within a
sequence the tiles run last-first: those see the most keys, so the longest programs start
earliest and the tail of the launch is short.

Causality: the KV loop stops at the last key the tile's last query sees, so tiles wholly
above the diagonal are never read; tiles wholly below it run without a mask, and only the
tiles crossing it (at most ``cdiv(BLOCK_Q, BLOCK_N) + 1``) pay for the mask.

Precision: float32 accumulation and softmax; fp16/bf16 use tensor-core dots (softmax
weights rounded to the input dtype before the PV product, as flash attention does);
float32 inputs use IEEE float32 dots (no TF32). Under the interpreter bf16 dots are
upcast to float32, because the interpreter's bf16 ``tl.dot`` is wrong.

Index tensors (``query_start_loc``, ``seq_lens``, both axes of ``block_tables``) are read
through their strides: strided, expanded and column-sliced views work without a copy.

The public function validates, then calls the custom op ``kvarena::paged_prefill_attention``
(registered here, with a fake implementation for torch.compile), which writes ``out`` and
does not validate again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import _runtime, reference
from ._checks import (FLOAT_DTYPES, LOG2E, OP_NAMESPACE, check_block_ids, check_gqa_heads,
                      check_head_dim, check_kv_cache, check_scale, check_shape, check_tensor,
                      host_values)


@triton.jit
def _find_sequence(qsl_ptr, s_qsl, pid, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i in [0, num_seqs) with ``qsl[i] // BLOCK_Q + i <= pid`` (binary search)."""
    lo = pid * 0  # a tensor from the start: the loop may not run (one sequence)
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(qsl_ptr + mid.to(tl.int64) * s_qsl) // BLOCK_Q + mid
        if first_tile <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, kv_ptr, table_row_ptr, stride_btc, kv_head_off, stride_kb,
                  stride_kt, stride_kv, qk_scale, row_pos, offs_d, d_mask, start, stop, kv_end, num_blocks,
                  BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key tiles ``[start, stop)``; the causal mask only when MASKED."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for tile_start in range(start, stop, BLOCK_N):
        offs_n = tile_start + offs_n0
        n_mask = offs_n < kv_end
        if BLOCK_SIZE % BLOCK_N == 0:
            # The tile lies inside one block: one table entry, rows at a fixed stride.
            blk = tl.load(table_row_ptr + (tile_start // BLOCK_SIZE) * stride_btc).to(tl.int64)
            in_block = (tile_start % BLOCK_SIZE) + offs_n0
            tok_off = blk * stride_kb + in_block.to(tl.int64) * stride_kt
            # A bad id can only come from an unchecked CUDA table: read nothing for it.
            ld_mask = offs_n < tl.where((blk >= 0) & (blk < num_blocks), kv_end, 0)
        else:
            # The tile spans several blocks: one table entry per key.
            blk = tl.load(table_row_ptr + (offs_n // BLOCK_SIZE) * stride_btc, mask=n_mask,
                          other=0).to(tl.int64)
            tok_off = blk * stride_kb + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_kt
            ld_mask = n_mask & (blk >= 0) & (blk < num_blocks)
        k_ptrs = kv_ptr + kv_head_off + tok_off[None, :] + offs_d[:, None]
        kv_mask = ld_mask[None, :] & d_mask[:, None]
        k_t = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [D_PAD, BLOCK_N]
        if UPCAST:
            qk = tl.dot(q.to(tl.float32), k_t.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        qk = qk * qk_scale  # log2 units: softmax through exp2
        if MASKED:
            visible = (offs_n[None, :] <= row_pos[:, None]) & n_mask[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_ptrs = kv_ptr + stride_kv + kv_head_off + tok_off[:, None] + offs_d[None, :]
        v = tl.load(v_ptrs, mask=ld_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        if UPCAST:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Sizes that only bound a range are not specialised (one binary whatever the batch, the
# cache or the table width); strides are (their divisibility lets loads vectorise).
@triton.jit(do_not_specialize=["num_seqs", "num_tokens", "num_blocks", "table_width"])
def _prefill_kernel(q_ptr, kv_ptr, table_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
                    num_seqs, qk_scale, num_tokens, num_blocks, table_width,
                    stride_qt, stride_qh, stride_kb, stride_kv, stride_kt, stride_kh,
                    stride_bt, stride_btc, stride_sl, stride_qsl, stride_ot, stride_oh,
                    GROUP: tl.constexpr, HEADS: tl.constexpr, SPLITS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # BLOCK_M rows = BLOCK_Q queries x HEADS heads.
    pid = tl.program_id(0)
    kv_head = tl.program_id(1) // SPLITS
    first_head_in_group = (tl.program_id(1) % SPLITS) * HEADS

    seq = _find_sequence(qsl_ptr, stride_qsl, pid, num_seqs, BLOCK_Q)
    seq64 = seq.to(tl.int64)
    q_start = tl.load(qsl_ptr + seq64 * stride_qsl)
    q_len = tl.load(qsl_ptr + (seq64 + 1) * stride_qsl) - q_start
    local_tile = pid - (q_start // BLOCK_Q + seq)
    num_q_tiles = tl.cdiv(q_len, BLOCK_Q)
    if local_tile >= num_q_tiles:
        return
    # Last tiles first: they see the most keys, so the longest programs start earliest.
    q_lo = (num_q_tiles - 1 - local_tile) * BLOCK_Q
    # Clamped to the table's reach: a bad length on an unchecked CUDA tensor must not read
    # past the block table (CPU inputs are validated before launch).
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq64 * stride_sl), table_width * BLOCK_SIZE)
    ctx = seq_len - q_len  # tokens before this sequence's first query

    offs_m = tl.arange(0, BLOCK_M)
    q_local = q_lo + offs_m // HEADS
    head_in_group = first_head_in_group + offs_m % HEADS
    head = kv_head * GROUP + head_in_group
    row_mask = (q_local < q_len) & (head_in_group < GROUP)
    row_pos = ctx + q_local  # the last key each row sees
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM

    tok = (q_start + q_local).to(tl.int64)
    row_mask = row_mask & (tok >= 0) & (tok < num_tokens)  # a bad query_start_loc on CUDA
    q_ptrs = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    q_hi = tl.minimum(q_lo + BLOCK_Q, q_len)
    kv_end = ctx + q_hi  # keys past this are above the diagonal for every row
    # Keys below ctx + q_lo + 1 are visible to every row of the tile: no mask needed. The
    # clamp changes nothing for valid inputs; for a bad query_start_loc on CUDA (q_lo past
    # q_len) it keeps the unmasked loop's table reads inside the sequence's blocks.
    unmasked_end = tl.minimum(((ctx + q_lo + 1) // BLOCK_N) * BLOCK_N, kv_end)
    table_row_ptr = table_ptr + seq64 * stride_bt
    kv_head_off = kv_head.to(tl.int64) * stride_kh
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, kv_ptr, table_row_ptr, stride_btc,
                                  kv_head_off,
                                  stride_kb, stride_kt, stride_kv, qk_scale, row_pos,
                                  offs_d, d_mask, 0, unmasked_end, kv_end, num_blocks,
                                  BLOCK_N, BLOCK_SIZE, False, UPCAST, DOT_PRECISION)
    acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, kv_ptr, table_row_ptr, stride_btc,
                                  kv_head_off,
                                  stride_kb, stride_kt, stride_kv, qk_scale, row_pos,
                                  offs_d, d_mask, unmasked_end, kv_end, kv_end, num_blocks,
                                  BLOCK_N, BLOCK_SIZE, True, UPCAST, DOT_PRECISION)
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@dataclass(frozen=True)
class TileConfig:
    """Launch shape: ``block_m`` tile rows (queries x folded heads), ``block_n`` keys per
    KV tile, ``heads`` query heads folded into a tile (a power of two), warps and stages."""
    block_m: int
    block_n: int
    heads: int
    num_warps: int
    num_stages: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(head_dim: int, group: int, dtype: torch.dtype, *,
                   interpret: bool | None = None) -> TileConfig:
    """The tile shape used for a launch (chosen by reasoning, not yet tuned on hardware).

    On a GPU the rows are 128 for 2-byte dtypes up to head_dim 128, fewer for head_dim >
    128 or float32 so that registers do not spill and the pipelined K/V stages fit in
    shared memory (<= ~100 KiB, which also fits an A100); at most ``block_m // 16`` heads are folded so a tile keeps >= 16
    queries (fine-grained causal skipping; a decode row wastes up to 15/16 of its tile).
    Under the interpreter the cost is per program and per tile, not per element, so tiles
    are kept large.
    """
    if interpret is None:
        interpret = _runtime.INTERPRET
    d_pad = max(16, _next_pow2(head_dim))
    # GPU choices were checked by compiling for sm_90 without a device (registers, spills,
    # shared memory; see the report in the README): none spills, all use wgmma/cp.async
    # (fp16/bf16) and stay under ~100 KiB of shared memory. Not yet timed on hardware.
    if interpret:
        block_m, block_n, warps, stages = 64, 64, 4, 1
    elif dtype == torch.float32:
        # IEEE fp32 dots run on FMA units from registers: small tiles avoid spills.
        block_m, block_n, warps, stages = (32, 32, 8, 2) if d_pad <= 64 else (32, 16, 8, 2)
    elif d_pad > 128 or head_dim % 16:
        # head_dim % 16 != 0 (e.g. 120): strides lose 16-element alignment, loads are not
        # vectorised (no cp.async), and larger tiles spill.
        block_m, block_n, warps, stages = 64, 32, 8, 2
    elif d_pad == 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 128, 64, 4, 3
    heads = min(_next_pow2(group), block_m // 16)
    return TileConfig(block_m, block_n, heads, warps, stages)


def _validate(query, kv_cache, block_tables, seq_lens, query_start_loc, scale, out):
    """Every check that needs no device sync; index values too when they are on the host."""
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    device = query.device
    num_blocks, block_size, num_kv_heads, kv_head_dim = check_kv_cache(kv_cache)
    check_tensor("kv_cache", kv_cache, device=device)
    if kv_cache.dtype != query.dtype:
        raise TypeError(f"kv_cache dtype {kv_cache.dtype} must equal query dtype {query.dtype}")
    num_tokens, num_heads, head_dim = query.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"kv_cache head_dim {kv_head_dim} must equal query head_dim {head_dim}")
    check_head_dim("query", head_dim)
    check_gqa_heads(num_heads, num_kv_heads)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    num_seqs = block_tables.shape[0]
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    check_shape("seq_lens", seq_lens, (num_seqs,))
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=(torch.int32,), device=device)
    check_shape("query_start_loc", query_start_loc, (num_seqs + 1,))
    if out is not None:
        check_tensor("out", out, dtypes=(query.dtype,), device=device)
        check_shape("out", out, tuple(query.shape))
        if out.stride(-1) != 1:
            raise ValueError("out head_dim must be contiguous (stride 1), "
                             f"got strides {out.stride()}")
    _validate_host_indices(num_tokens, block_size, num_blocks, block_tables, seq_lens,
                           query_start_loc)


def _validate_host_indices(num_tokens, block_size, num_blocks, block_tables, seq_lens,
                           query_start_loc):
    """Index-range checks, done only when the index tensors live on the host (no sync)."""
    qsl, lens = host_values(query_start_loc), host_values(seq_lens)
    table = host_values(block_tables)
    if qsl is None or lens is None or table is None:
        return
    qsl, lens = qsl.long(), lens.long()
    if int(qsl[0]) != 0:
        raise ValueError(f"query_start_loc must start at 0, got {int(qsl[0])}")
    q_lens = qsl[1:] - qsl[:-1]
    if bool((q_lens < 0).any()):
        raise ValueError("query_start_loc must be non-decreasing")
    if int(qsl[-1]) != num_tokens:
        raise ValueError(f"query_start_loc must end at num_tokens={num_tokens}, got {int(qsl[-1])}")
    if lens.numel() == 0:
        return
    if bool((q_lens > lens).any()):
        i = int(torch.nonzero(q_lens > lens)[0])
        # Also catches seq_lens < 1 where a sequence has queries, and any negative length.
        raise ValueError(f"seq_lens[{i}]={int(lens[i])} is shorter than its "
                         f"{int(q_lens[i])} queries (query_start_loc)")
    width = table.shape[1]
    max_len = int(lens.max())
    if width * block_size < max_len:
        raise ValueError(f"block_tables width {width} x block_size {block_size} cannot hold "
                         f"seq_lens up to {max_len}")
    # Only the entries a sequence with queries uses must be valid: padding may hold anything.
    check_block_ids(table, lens, block_size, num_blocks, active=q_lens > 0)


def _launch(query, kv_cache, block_tables, seq_lens, query_start_loc, out, scale: float,
            config: TileConfig | None = None) -> None:
    """Launch the kernel on validated arguments (``query`` and ``out`` head_dim-contiguous)."""
    num_tokens, num_heads, head_dim = query.shape
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    cfg = config or default_config(head_dim, group, query.dtype)
    heads = cfg.heads
    if heads & (heads - 1) or cfg.block_m % heads or cfg.block_m // heads < 1:
        raise ValueError(f"config heads={heads} must be a power of two dividing "
                         f"block_m={cfg.block_m}")
    splits = triton.cdiv(group, heads)
    block_q = cfg.block_m // heads
    upcast = _runtime.INTERPRET and query.dtype == torch.bfloat16
    precise = query.dtype == torch.float32 or upcast
    grid = (num_tokens // block_q + num_seqs, num_kv_heads * splits)
    _prefill_kernel[grid](
        query, kv_cache, block_tables, seq_lens, query_start_loc, out,
        num_seqs, scale * LOG2E, num_tokens, kv_cache.shape[0], block_tables.shape[1],
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), block_tables.stride(1), seq_lens.stride(0),
        query_start_loc.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEADS=heads, SPLITS=splits,
        HEAD_DIM=head_dim, D_PAD=max(16, _next_pow2(head_dim)),
        BLOCK_M=cfg.block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, BLOCK_SIZE=block_size,
        UPCAST=upcast, DOT_PRECISION="ieee" if precise else None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


@torch.library.custom_op(f"{OP_NAMESPACE}::paged_prefill_attention", mutates_args=("out",))
def paged_prefill_attention_op(query: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor,
                               query_start_loc: torch.Tensor, out: torch.Tensor,
                               scale: float) -> None:
    """``kvarena::paged_prefill_attention``: writes ``out`` in place.

    Arguments as in :func:`paged_prefill_attention`, which validates them (the op does not
    check them again); ``out`` and ``scale`` must be given. Triton where
    :func:`_runtime.use_triton` says so, else the torch reference.
    """
    if query.stride(-1) != 1:
        query = query.contiguous()
    if _runtime.use_triton(query, kv_cache, block_tables, seq_lens, query_start_loc, out):
        _launch(query, kv_cache, block_tables, seq_lens, query_start_loc, out, scale)
    else:
        out.copy_(reference.paged_prefill_attention_ref(
            query, kv_cache, block_tables, seq_lens, query_start_loc, scale=scale))


@paged_prefill_attention_op.register_fake
def _prefill_op_fake(query, kv_cache, block_tables, seq_lens, query_start_loc, out, scale) -> None:
    return None


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, *, scale: float | None = None,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's last ``q_i`` tokens over its paged KV context.

    query: ``[num_tokens, num_heads, head_dim]`` float16/bfloat16/float32, sequences
    concatenated (any strides; copied if head_dim is not contiguous).
    kv_cache: one layer's view ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` of
    query's dtype (0 = key, 1 = value), any strides with head_dim contiguous;
    ``num_heads % num_kv_heads == 0``; head_dim 1..256 (non powers of two are padded).
    Index tensors may have any strides (read in place, never copied).
    block_tables: int32 ``[num_seqs, W]``, block ids; entries past a sequence's last block
    are never read. seq_lens: int32 ``[num_seqs]``, context tokens including the queries.
    query_start_loc: int32 ``[num_seqs + 1]``, cumulative query counts from 0 to num_tokens;
    ``q_i = query_start_loc[i+1] - query_start_loc[i]`` (0 allowed, 1 = a decode row).
    Query j of sequence i sees context tokens ``0 .. seq_lens[i] - q_i + j``.
    scale: softmax scale, default ``head_dim ** -0.5``. out: optional tensor of query's
    shape, dtype and device (head_dim contiguous), written and returned.

    Returns ``[num_tokens, num_heads, head_dim]`` in query's dtype; accumulation in float32
    (float32 inputs use exact IEEE float32 dots, no TF32). On CUDA there is no host sync
    (CUDA-graph capturable); index values are range-checked only when they are on the host.
    """
    _validate(query, kv_cache, block_tables, seq_lens, query_start_loc, scale, out)
    scale = check_scale(scale, query.shape[-1])
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    paged_prefill_attention_op(query, kv_cache, block_tables, seq_lens, query_start_loc, out,
                               scale)
    return out
