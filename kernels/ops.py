"""The kernels as torch custom ops (namespace ``kvarena``), so torch.compile traces through
them as single opaque calls and CUDA graphs capture them like any other op.

Each op mutates a tensor its caller passes in and returns nothing: ``kvarena::write_kv``
writes ``kv_cache``; ``kvarena::paged_decode_attention`` writes ``out``. Mutating a
caller-owned output (instead of returning a fresh tensor) keeps the op's memory under the
caller's control, which is what a captured decode step needs. The public Python functions
(:func:`kernels.write_kv`, :func:`kernels.paged_decode_attention`) validate their arguments
before calling these ops, so the ops themselves do no checking.

Other kernel modules register their own ops in the same namespace following this pattern
(public function: validate -> :func:`prepare_out` -> op; op: launch; fake: nothing).
"""
from __future__ import annotations

import torch

from ._checks import check_shape, check_tensor

NAMESPACE = "kvarena"


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


@torch.library.custom_op(f"{NAMESPACE}::write_kv", mutates_args=("kv_cache",))
def write_kv_op(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """Scatter key/value into kv_cache at slot_mapping (see :func:`kernels.write_kv`)."""
    from .write_kv import launch_write_kv  # late: write_kv imports this module

    launch_write_kv(kv_cache, key, value, slot_mapping)


@write_kv_op.register_fake
def _write_kv_fake(kv_cache, key, value, slot_mapping) -> None:
    return None


@torch.library.custom_op(f"{NAMESPACE}::paged_decode_attention", mutates_args=("out",))
def paged_decode_attention_op(query: torch.Tensor, kv_cache: torch.Tensor,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor,
                              out: torch.Tensor, scale: float, num_splits: int) -> None:
    """Decode attention into ``out`` (see :func:`kernels.paged_decode_attention`);
    ``num_splits`` is the context split count already chosen from the shapes."""
    from .decode_attention import launch_decode_attention  # late: it imports this module

    launch_decode_attention(query, kv_cache, block_tables, seq_lens, out, scale, num_splits)


@paged_decode_attention_op.register_fake
def _paged_decode_attention_fake(query, kv_cache, block_tables, seq_lens, out, scale,
                                 num_splits) -> None:
    return None
