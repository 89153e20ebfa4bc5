"""Paged decode attention: one query token per sequence over its paged context.

Layout of the work (flash-decoding with GQA grouping):

* One program per (sequence, KV head [, chunk of its query heads], context split). All the
  query heads that share a KV head are loaded together as a ``[BLOCK_G, head_dim]`` tile,
  so each K/V token is read from memory once per KV head, not once per query head.
* The program walks its split ``TILE_N`` tokens at a time. A tile may span several cache
  blocks: each token's block id is gathered from the block table, which makes block sizes
  8..128 one code path and keeps tiles wide even with small blocks.
* Softmax is online, in float32, in the log2 domain (scale * log2(e) folded into the scores).
* With one split the program writes the final output. With several, each writes its
  normalised partial output and log-sum-exp, and a second kernel merges the splits. The
  split count comes from shapes only (never from ``seq_lens`` values), so a call is
  host-sync free and can be captured in a CUDA graph.
* ``seq_lens`` and ``block_tables`` are read through their strides (any view, no copy).

The public :func:`paged_decode_attention` validates, then calls the custom op
``kvarena::paged_decode_attention`` registered here (mutates ``out``; the fake does nothing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime, reference
from ._checks import (FLOAT_DTYPES, LOG2E, MAX_HEAD_DIM, OP_NAMESPACE, check_block_ids,
                      check_gqa_heads, check_head_dim, check_kv_cache, check_scale, check_shape,
                      check_tensor, host_values, prepare_out)

MAX_SPLITS = 64
# A split shorter than this costs more in its partial write and merge than it saves.
_MIN_SPLIT_TOKENS_GPU = 256
# The interpreter runs programs one after another, so splitting buys nothing there; these
# nominal numbers only make CPU runs take the same multi-split code path as a GPU would.
_CPU_NOMINAL_SMS = 4
_MIN_SPLIT_TOKENS_CPU = 64


# Sizes that only bound a range or an index are not specialised, so the cache's size, the
# table's width and the batch do not each make a new binary; strides, head_dim and
# block_size are (their divisibility lets loads vectorise).
@triton.jit(do_not_specialize=["num_cache_blocks", "table_width", "num_splits", "head_chunks",
                               "num_heads"])
def _decode_split_kernel(
        q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
        qk_scale, num_cache_blocks, table_width, group, head_dim, block_size,
        num_splits, head_chunks, num_heads,
        s_qs, s_qh, s_qd, s_cb, s_ckv, s_cs, s_ch, s_bts, s_btc, s_sl, s_os, s_oh,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
        USE_DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // head_chunks
    chunk = tl.program_id(1) % head_chunks
    split = tl.program_id(2)

    g = chunk * BLOCK_G + tl.arange(0, BLOCK_G)  # query head index within the GQA group
    g_mask = g < group
    heads = kv_head * group + g
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim

    # Clamping to the table's reach keeps a bad length on an unchecked CUDA tensor from
    # reading past the block table (CPU inputs are validated before launch).
    seq_len = tl.minimum(tl.load(seq_lens_ptr + seq.to(tl.int64) * s_sl),
                         table_width * block_size)
    # Splits are sized per sequence (equal shares of its own length, whole tiles each), so
    # short sequences in a batch of long ones leave their trailing splits empty.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), TILE_N) * TILE_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    seq64 = seq.to(tl.int64)
    q = tl.load(q_ptr + seq64 * s_qs + heads[:, None] * s_qh + d[None, :] * s_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + seq64 * s_bts
    for t0 in range(start, end, TILE_N):
        t = t0 + tl.arange(0, TILE_N)
        t_mask = t < end
        bid = tl.load(bt_row + (t // block_size) * s_btc, mask=t_mask, other=0)
        # Out-of-range ids can only come from unchecked CUDA tables: read nothing for them.
        ld_mask = t_mask & (bid >= 0) & (bid < num_cache_blocks)
        row = bid.to(tl.int64) * s_cb + (t % block_size) * s_cs + kv_head * s_ch
        kv_mask = ld_mask[:, None] & d_mask[None, :]
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + s_ckv + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if USE_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        else:
            # One query head per KV head: a dot would waste 15/16 of its rows, and the
            # broadcast product stays small ([1, TILE_N, BLOCK_D]).
            qk = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        qk = tl.where(t_mask[None, :], qk * qk_scale, float("-inf"))
        # Every tile holds at least one valid token, so m_new is finite and alpha is never
        # exp2(-inf - -inf).
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # An empty split (or a zero-length sequence) has l_i == 0: it writes zeros, and a
    # log-sum-exp of -inf that gives it no weight in the merge.
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + seq64 * s_os + heads[:, None] * s_oh + d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        row_id = (seq64 * num_heads + heads) * num_splits + split  # [seq, head, split]
        tl.store(mid_o_ptr + row_id[:, None] * BLOCK_D + d[None, :], o, mask=g_mask[:, None])
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + row_id, lse, mask=g_mask)


@triton.jit(do_not_specialize=["num_heads", "num_splits"])
def _merge_splits_kernel(mid_o_ptr, mid_lse_ptr, out_ptr, num_heads, num_splits, head_dim,
                         s_os, s_oh, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    base = (seq.to(tl.int64) * num_heads + head) * num_splits
    lse = tl.load(mid_lse_ptr + base + s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: every weight becomes 0
    w = tl.math.exp2(lse - m)
    total = tl.sum(w, axis=0)
    o = tl.load(mid_o_ptr + (base + s)[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None],
                other=0.0)
    res = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * s_os + head * s_oh + d, res.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


_SM_COUNTS: dict[int, int] = {}


@torch.compiler.assume_constant_result  # torch.compile bakes it in instead of tracing it
def _sm_count(device_index: int) -> int:
    if device_index not in _SM_COUNTS:
        _SM_COUNTS[device_index] = torch.cuda.get_device_properties(
            device_index).multi_processor_count
    return _SM_COUNTS[device_index]


def _group_tile(group: int, block_d: int) -> tuple[int, bool]:
    """(BLOCK_G, USE_DOT) for a GQA group of ``group`` query heads per KV head."""
    if group == 1:
        return 1, False
    # tl.dot needs >= 16 rows on a GPU; beyond 64 x 128 accumulators the program's
    # registers spill, so large groups (MQA with many heads) are cut into chunks.
    cap = max(16, 8192 // block_d)
    return max(16, min(triton.next_power_of_2(group), cap)), True


def choose_num_splits(num_seqs: int, programs_per_seq: int, max_context: int,
                      device: torch.device) -> int:
    """Context splits per (sequence, KV head), from shapes alone (no device sync).

    Splits until the grid holds about four programs per SM (CUDA; a nominal count on CPU:
    decode is bandwidth-bound, and a few resident programs per SM keep enough loads in flight),
    but never below ``_MIN_SPLIT_TOKENS_*`` tokens of ``max_context`` (the block table's
    reach) per split and never above ``MAX_SPLITS``. Returns 1 when the batch alone fills
    the device, in which case no merge kernel runs.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        target, min_tokens = 4 * _sm_count(index), _MIN_SPLIT_TOKENS_GPU
    else:
        target, min_tokens = _CPU_NOMINAL_SMS, _MIN_SPLIT_TOKENS_CPU
    base = max(1, num_seqs * programs_per_seq)
    if base >= target:
        return 1
    return max(1, min(triton.cdiv(target, base), max_context // min_tokens, MAX_SPLITS))


def _tile_n(block_d: int, fp32_operands: bool, use_dot: bool) -> int:
    # K and V tiles of TILE_N x BLOCK_D elements: 64 x 128 halves is 16 KiB each, which keeps
    # enough loads in flight per SM; wider rows or float32 operands (twice the registers)
    # take half as many tokens so that sm_90 builds do not spill. The broadcast path (one
    # query head per KV head) holds its float32 products in registers too: with float32
    # operands it takes 16 tokens (32 x 128 spilled 8 bytes on sm_90).
    if not use_dot and fp32_operands:
        return 16
    return 64 if block_d <= 128 and not fp32_operands else 32


@torch.library.custom_op(f"{OP_NAMESPACE}::paged_decode_attention", mutates_args=("out",))
def paged_decode_attention_op(query: torch.Tensor, kv_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              out: torch.Tensor, scale: float, num_splits: int) -> None:
    """``kvarena::paged_decode_attention``: decode attention into ``out`` on arguments
    :func:`paged_decode_attention` has validated (not checked again here); ``num_splits``
    is the context split count already chosen. Triton where :func:`_runtime.use_triton`
    says so, else the torch reference."""
    num_seqs, num_heads, head_dim = query.shape
    if num_seqs == 0:
        return
    if not _runtime.use_triton(query, kv_cache, block_tables, seq_lens, out):
        out.copy_(reference.paged_decode_attention_ref(query, kv_cache, block_tables, seq_lens,
                                                       scale=scale))
        return
    num_cache_blocks, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g, use_dot = _group_tile(group, block_d)
    head_chunks = triton.cdiv(group, block_g)
    # bf16 tl.dot is wrong in the interpreter, and tl.dot needs equal operand dtypes: both
    # cases compute on float32 operands (more registers, so only where needed).
    upcast = query.dtype != kv_cache.dtype or (_runtime.INTERPRET and torch.bfloat16 in
                                               (query.dtype, kv_cache.dtype))
    fp32_dot = upcast or kv_cache.dtype == torch.float32
    # Exact float32 products only where both inputs are float32: with a 16-bit operand
    # stored, tf32 loses nothing that storage had not (and sm_90 ieee builds of the mixed
    # case spill heavily).
    ieee = query.dtype == kv_cache.dtype == torch.float32
    single = num_splits == 1
    if single:
        mid_o = mid_lse = out  # unused placeholders
    else:
        mid_o = torch.empty((num_seqs, num_heads, num_splits, block_d), dtype=torch.float32,
                            device=query.device)
        mid_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32,
                              device=query.device)
    grid = (num_seqs, num_kv_heads * head_chunks, num_splits)
    _decode_split_kernel[grid](
        query, kv_cache, block_tables, seq_lens, out, mid_o, mid_lse,
        scale * LOG2E, num_cache_blocks, block_tables.shape[1], group, head_dim, block_size,
        num_splits, head_chunks, num_heads,
        *query.stride(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3), *block_tables.stride(), seq_lens.stride(0), out.stride(0),
        out.stride(1),
        BLOCK_G=block_g, BLOCK_D=block_d, TILE_N=_tile_n(block_d, fp32_dot, use_dot), USE_DOT=use_dot,
        UPCAST=upcast, DOT_PRECISION="ieee" if ieee else "tf32",
        SINGLE_SPLIT=single, num_warps=8 if block_g * block_d >= 8192 else 4)
    if not single:
        _merge_splits_kernel[(num_seqs, num_heads)](
            mid_o, mid_lse, out, num_heads, num_splits, head_dim, out.stride(0), out.stride(1),
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4)


@paged_decode_attention_op.register_fake
def _paged_decode_attention_fake(query, kv_cache, block_tables, seq_lens, out, scale,
                                 num_splits) -> None:
    return None


def validate_decode(query, kv_cache, block_tables, seq_lens, num_splits) -> None:
    """Raise TypeError/ValueError naming the bad argument; reads values of CPU tensors only."""
    num_cache_blocks, block_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    dev = kv_cache.device
    check_head_dim("kv_cache", head_dim)
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    num_seqs, num_heads = query.shape[0], query.shape[1]
    check_shape("query", query, (None, None, head_dim))
    check_gqa_heads(num_heads, num_kv_heads)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=dev)
    check_shape("block_tables", block_tables, (num_seqs, None))
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables must have at least one column")
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=dev)
    check_shape("seq_lens", seq_lens, (num_seqs,))
    if num_splits is not None and (isinstance(num_splits, bool) or
                                   not isinstance(num_splits, int) or
                                   not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_SPLITS}], "
                         f"got {num_splits!r}")
    lens, table = host_values(seq_lens), host_values(block_tables)
    if lens is None or table is None or num_seqs == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(lens.min()), int(lens.max())
    if lo < 1:
        raise ValueError(f"seq_lens must be >= 1 (it counts the current token), got {lo}")
    reach = block_tables.shape[1] * block_size
    if hi > reach:
        raise ValueError(f"seq_lens holds {hi} tokens but block_tables has "
                         f"{block_tables.shape[1]} columns x block_size {block_size} = {reach}")
    check_block_ids(table, lens, block_size, num_cache_blocks)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                           scale: float | None = None, out: torch.Tensor | None = None,
                           num_splits: int | None = None) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged context.

    query: ``[num_seqs, num_heads, head_dim]`` float16/bfloat16/float32 (any strides).
    kv_cache: one layer's view ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``, any
    strides with head_dim contiguous; ``num_heads % num_kv_heads == 0`` (MHA, GQA, MQA);
    head_dim up to 256 (any value, powers of two or not). block_tables: int32
    ``[num_seqs, max_blocks_per_seq]``, row i lists sequence i's cache blocks in order.
    Both index tensors may have any strides (read in place, never copied).
    seq_lens: int32 ``[num_seqs]``, context length in tokens (>= 1, counting the current
    token, whose K/V are already written). scale: softmax scale, default ``head_dim ** -0.5``.
    out: optional ``[num_seqs, num_heads, head_dim]`` tensor of query's dtype and device,
    written and returned. num_splits: optional override of the context split count (1..64;
    by default chosen from the shapes and the device's SM count).

    Returns ``[num_seqs, num_heads, head_dim]`` in query's dtype; softmax and accumulation
    in float32. Index ranges are checked when seq_lens/block_tables are on the CPU; on CUDA
    nothing is read back, so the call can be captured in a CUDA graph.
    """
    validate_decode(query, kv_cache, block_tables, seq_lens, num_splits)
    scale = check_scale(scale, kv_cache.shape[-1])
    out = prepare_out(out, query)
    if query.shape[0] == 0:
        return out
    if num_splits is None:
        group = query.shape[1] // kv_cache.shape[3]
        chunks = triton.cdiv(group, _group_tile(group, max(16, triton.next_power_of_2(
            kv_cache.shape[4])))[0])
        num_splits = choose_num_splits(query.shape[0], kv_cache.shape[3] * chunks,
                                       block_tables.shape[1] * kv_cache.shape[2], query.device)
    paged_decode_attention_op(query, kv_cache, block_tables, seq_lens, out, scale, num_splits)
    return out
