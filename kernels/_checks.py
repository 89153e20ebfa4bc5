"""Argument checks and constants shared by the kernels: every failure names the argument it
is about.

Checks here never synchronise with a device: values of CUDA tensors are not read. Index
tensors (slot mappings, block ids, lengths, offsets) may have any strides, including 0
(expanded) and column slices of a 2-D metadata tensor: the kernels read them through
their strides, so nothing here asks for contiguity.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# Every kernel registers its torch custom op in this namespace (torch.ops.kvarena.*).
OP_NAMESPACE = "kvarena"
LOG2E = 1.4426950408889634  # softmax runs in the log2 domain: exp(x) == exp2(x * LOG2E)
MAX_HEAD_DIM = 256  # the attention kernels' widest tile; beyond it they would spill


def check_tensor(name: str, t: object, *, ndim: int | None = None,
                 dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """Raise TypeError/ValueError naming ``name`` unless ``t`` is a tensor of that rank,
    one of ``dtypes`` and on ``device``. Returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but must be on {device}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``t.shape`` matches ``expected``
    (``None`` entries match any size)."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        want = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def host_values(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` itself when its values can be read without a device sync (CPU), else None."""
    return t if t.device.type == "cpu" else None


def check_kv_cache(kv_cache: object) -> tuple[int, int, int, int]:
    """Check one layer's cache view; returns (num_blocks, block_size, num_kv_heads, head_dim).

    Raises TypeError/ValueError naming ``kv_cache`` unless it is a float16/bfloat16/float32
    tensor ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` with no empty dimension and
    a contiguous head_dim. Shared by every kernel that reads or writes the cache.
    """
    check_tensor("kv_cache", kv_cache, ndim=5, dtypes=FLOAT_DTYPES)
    num_blocks, two, block_size, num_kv_heads, head_dim = kv_cache.shape
    if two != 2:
        raise ValueError("kv_cache must be [num_blocks, 2, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(kv_cache.shape)}")
    if min(kv_cache.shape) < 1:
        raise ValueError(f"kv_cache has an empty dimension: shape {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("kv_cache must have a contiguous head_dim, "
                         f"got strides {kv_cache.stride()}")
    return num_blocks, block_size, num_kv_heads, head_dim


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale to use: ``head_dim ** -0.5`` for None, else ``scale`` as a float.
    TypeError unless a real number; ValueError unless finite."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_block_ids(table: torch.Tensor, lens: torch.Tensor, block_size: int, num_blocks: int,
                    active: torch.Tensor | None = None) -> None:
    """Host tensors only: every entry a sequence uses (the first ``ceil(lens[i] /
    block_size)`` of row i, for rows where ``active`` is True) must be a block id in
    ``[0, num_blocks)``; padding beyond may hold anything. Raises ValueError naming
    ``block_tables`` and the first bad entry."""
    width = table.shape[1]
    used = (torch.arange(width).unsqueeze(0)
            < ((lens.long() + block_size - 1) // block_size).unsqueeze(1))
    if active is not None:
        used &= active.unsqueeze(1)
    bad = used & ((table < 0) | (table >= num_blocks))
    if bad.any():
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"block_tables[{i}, {j}] = {int(table[i, j])} is outside the cache's "
                         f"{num_blocks} blocks")


def check_gqa_heads(num_heads: int, num_kv_heads: int) -> None:
    """Raise ValueError naming ``query`` unless its head count is a positive multiple of
    kv_cache's KV head count (MHA, GQA and MQA all satisfy this)."""
    if num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query has {num_heads} heads, which is not a positive multiple of "
                         f"kv_cache's {num_kv_heads} KV heads")


def check_head_dim(name: str, head_dim: int) -> None:
    """Raise ValueError naming ``name`` unless its head_dim is in ``[1, MAX_HEAD_DIM]``."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{name} head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def check_no_overlap(name: str, t: torch.Tensor) -> None:
    """Raise ValueError naming ``name`` when ``t`` has a stride-0 (expanded) dimension of
    size > 1: several elements share one memory location, so it cannot be written in place."""
    if any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride())):
        raise ValueError(f"{name} is rewritten in place, so it must not be an expanded view "
                         f"(stride 0); got strides {t.stride()} for shape {tuple(t.shape)}")


def prepare_out(out: torch.Tensor | None, like: torch.Tensor, name: str = "out") -> torch.Tensor:
    """The output buffer for an op writing a result shaped and typed like ``like``.

    Returns ``torch.empty_like(like)`` (contiguous) when ``out`` is None; otherwise checks
    that ``out`` is a tensor with ``like``'s shape, dtype and device and a contiguous last
    dimension, raising TypeError/ValueError naming ``name``, and returns it unchanged.
    """
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    check_tensor(name, out, ndim=like.dim(), dtypes=(like.dtype,), device=like.device)
    check_shape(name, out, tuple(like.shape))
    if out.numel() and out.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, "
                         f"got strides {out.stride()}")
    return out
