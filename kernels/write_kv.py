"""Scatter new tokens' key/value vectors into the paged KV cache.

One program writes one token's heads (or a chunk of them, when heads x head_dim is large):
the token's slot is read once, and a whole ``[heads, head_dim]`` tile of K and of V moves as
two vectorised loads and stores. Dtype conversion to the cache's dtype happens in the store,
so callers never materialise a converted copy. ``slot_mapping`` is read through its stride,
so a strided, expanded or column-sliced view (``meta[:, 0]``) needs no copy.

The public :func:`write_kv` validates, then calls the custom op ``kvarena::write_kv``
registered here (mutates ``kv_cache``; its fake implementation does nothing), which
launches the kernel without validating again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime, reference
from ._checks import (FLOAT_DTYPES, OP_NAMESPACE, check_kv_cache, check_shape, check_tensor,
                      host_values)

# Elements of K (and as many of V) one program moves: big enough for full 16-byte vectors
# on every thread, small enough to keep register use low at head_dim 256 x many heads.
_TILE_ELEMS = 4096


# Sizes that only bound a range are not specialised (one binary for every cache size);
# strides, head counts and head_dim are, since their divisibility lets loads vectorise.
@triton.jit(do_not_specialize=["num_slots"])
def _write_kv_kernel(cache_ptr, key_ptr, value_ptr, slot_ptr,
                     num_heads, head_dim, num_slots, block_size, s_slot,
                     s_cb, s_ckv, s_cs, s_ch,
                     s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)
    hchunk = tl.program_id(1)
    slot = tl.load(slot_ptr + tok.to(tl.int64) * s_slot)
    # slot < 0 marks padding; slot >= num_slots can only come from an unchecked CUDA
    # tensor, and dropping it is safer than writing outside the cache.
    if (slot >= 0) & (slot < num_slots):
        blk = slot // block_size
        off = slot % block_size
        h = hchunk * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (h[:, None] < num_heads) & (d[None, :] < head_dim)
        tok64 = tok.to(tl.int64)
        k = tl.load(key_ptr + tok64 * s_kt + h[:, None] * s_kh + d[None, :] * s_kd, mask=mask)
        v = tl.load(value_ptr + tok64 * s_vt + h[:, None] * s_vh + d[None, :] * s_vd, mask=mask)
        dst = cache_ptr + blk * s_cb + off * s_cs + h[:, None] * s_ch + d[None, :]
        ty = cache_ptr.dtype.element_ty
        tl.store(dst, k.to(ty), mask=mask)
        tl.store(dst + s_ckv, v.to(ty), mask=mask)


def validate_write_kv(kv_cache, key, value, slot_mapping) -> None:
    """Raise TypeError/ValueError naming the bad argument; reads values of CPU tensors only."""
    num_blocks, block_size, num_kv_heads, head_dim = check_kv_cache(kv_cache)
    dev = kv_cache.device
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check_shape("key", key, (None, num_kv_heads, head_dim))
    check_tensor("value", value, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    check_shape("value", value, tuple(key.shape))
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=dev)
    check_shape("slot_mapping", slot_mapping, (key.shape[0],))
    slots = host_values(slot_mapping)
    # Under torch.compile the values are not readable while tracing; the kernel still drops
    # out-of-range slots, so skipping this check cannot cause an out-of-bounds write.
    if slots is not None and slots.numel() and not torch.compiler.is_compiling():
        hi = int(slots.max())
        if hi >= num_blocks * block_size:
            raise ValueError(f"slot_mapping holds slot {hi}, outside the cache's "
                             f"{num_blocks} blocks x {block_size} slots")


@torch.library.custom_op(f"{OP_NAMESPACE}::write_kv", mutates_args=("kv_cache",))
def write_kv_op(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    """``kvarena::write_kv``: the scatter on arguments :func:`write_kv` has validated
    (the op does not check them again): Triton where :func:`_runtime.use_triton` says so,
    else the torch reference. Writes ``kv_cache`` in place."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    if not _runtime.use_triton(kv_cache, key, value, slot_mapping):
        reference.write_kv_ref(kv_cache, key, value, slot_mapping)
        return
    _, _, block_size, num_heads, head_dim = kv_cache.shape
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, _TILE_ELEMS // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _write_kv_kernel[grid](
        kv_cache, key, value, slot_mapping,
        num_heads, head_dim, kv_cache.shape[0] * block_size, block_size, slot_mapping.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        *key.stride(), *value.stride(),
        BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )


@write_kv_op.register_fake
def _write_kv_fake(kv_cache, key, value, slot_mapping) -> None:
    return None


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V into its cache slot, in place.

    kv_cache: one layer's view ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``
    (float16/bfloat16/float32, any strides with head_dim contiguous; index 0 = key, 1 = value).
    key, value: ``[num_tokens, num_kv_heads, head_dim]``, any float dtype and strides; cast to
    kv_cache's dtype on the way in. slot_mapping: int64 ``[num_tokens]``, any stride (read
    in place, never copied), slot = block_id *
    block_size + offset; a negative slot skips its token. Slots must be distinct (two tokens
    in one slot leave either one). On CPU the slot range is checked; on CUDA nothing is read
    back (no host sync) and out-of-range slots are dropped by the kernel. Goes through the
    ``kvarena::write_kv`` custom op, so torch.compile and CUDA graphs see one opaque call.
    """
    validate_write_kv(kv_cache, key, value, slot_mapping)
    if key.shape[0] == 0:
        return
    write_kv_op(kv_cache, key, value, slot_mapping)
