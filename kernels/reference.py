"""Plain-torch references for every kernel, written for clarity rather than speed.

Tests compare the Triton kernels against these; on CPU without ``TRITON_INTERPRET=1`` the
public functions fall back to them. All arithmetic is in float32 (or float64 when asked).
Layouts follow API.md: ``kv_cache`` is one layer's view
``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (index 0 = key, 1 = value).
"""
from __future__ import annotations

import torch


def write_kv_ref(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into ``kv_cache``.

    ``slot_mapping`` int64 ``[num_tokens]``: slot = block_id * block_size + offset; a
    negative slot skips its token. Writes in place, casting to ``kv_cache.dtype``.
    """
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blk, off = slots // block_size, slots % block_size
    kv_cache[blk, 0, off] = key[keep].to(kv_cache.dtype)
    kv_cache[blk, 1, off] = value[keep].to(kv_cache.dtype)


def gather_context(kv_cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int):
    """K and V of one sequence, contiguous: two ``[seq_len, num_kv_heads, head_dim]`` tensors."""
    block_size = kv_cache.shape[2]
    nblk = (seq_len + block_size - 1) // block_size
    ids = block_table_row[:nblk].long()
    k = kv_cache[ids, 0].reshape(-1, *kv_cache.shape[3:])[:seq_len]
    v = kv_cache[ids, 1].reshape(-1, *kv_cache.shape[3:])[:seq_len]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            first_visible: int, acc_dtype: torch.dtype) -> torch.Tensor:
    """Causal attention of ``q`` ``[nq, H, D]`` whose row j sees keys ``0 .. first_visible + j``."""
    nq, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.to(acc_dtype).repeat_interleave(group, dim=1)  # [L, H, D]
    v = v.to(acc_dtype).repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.to(acc_dtype), k) * scale
    # On q's device: a CPU mask cannot fill a CUDA tensor.
    rows = torch.arange(nq, device=q.device).unsqueeze(1) + first_visible
    cols = torch.arange(k.shape[0], device=q.device).unsqueeze(0)
    s = s.masked_fill((cols > rows).unsqueeze(0), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def paged_prefill_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor,
                                block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                query_start_loc: torch.Tensor, *, scale: float | None = None,
                                acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal attention of each sequence's last q_i tokens over its paged context.

    query ``[num_tokens, num_heads, head_dim]``; block_tables int32 ``[num_seqs, W]``;
    seq_lens int32 ``[num_seqs]``; query_start_loc int32 ``[num_seqs + 1]``. Query j of
    sequence i sees context tokens ``0 .. seq_lens[i] - q_i + j``. Returns query's shape and
    dtype (computed in ``acc_dtype``).
    """
    head_dim = query.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(query.shape, dtype=acc_dtype, device=query.device)
    qsl = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        a, b = qsl[i], qsl[i + 1]
        if b == a:
            continue
        k, v = gather_context(kv_cache, block_tables[i], seq_len)
        out[a:b] = _attend(query[a:b], k, v, scale, seq_len - (b - a), acc_dtype)
    return out.to(query.dtype)


def paged_decode_attention_ref(query: torch.Tensor, kv_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                               scale: float | None = None,
                               acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One query token per sequence over its whole paged context.

    query ``[num_seqs, num_heads, head_dim]``; returns the same shape in query's dtype.
    """
    n = query.shape[0]
    qsl = torch.arange(n + 1, dtype=torch.int32)
    return paged_prefill_attention_ref(query, kv_cache, block_tables, seq_lens, qsl,
                                       scale=scale, acc_dtype=acc_dtype)


def compact_blocks_ref(blocks: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                       block_tables: torch.Tensor | None = None) -> None:
    """Copy block ``src[k]`` to ``dst[k]`` for every k and remap matching table entries.

    ``blocks`` ``[num_blocks, ...]``; ``src``/``dst`` int ``[num_moves]`` (disjoint sets, no
    repeats); ``block_tables`` any-shape int32, entries equal to ``src[k]`` become ``dst[k]``.
    """
    if src.numel() == 0:
        return
    s, d = src.long().to(blocks.device), dst.long().to(blocks.device)
    blocks[d] = blocks[s]
    if block_tables is not None:
        remap = torch.arange(blocks.shape[0], dtype=block_tables.dtype,
                             device=block_tables.device)
        remap[s.to(block_tables.device)] = d.to(block_tables.device, block_tables.dtype)
        valid = (block_tables >= 0) & (block_tables < blocks.shape[0])
        block_tables.copy_(torch.where(valid, remap[block_tables.clamp(0, blocks.shape[0] - 1).long()],
                                       block_tables))
