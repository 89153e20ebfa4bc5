"""Triton kernels for a paged KV cache (signatures in API.md).

Every function accepts CUDA tensors (compiled Triton) and CPU tensors (Triton's interpreter
when ``TRITON_INTERPRET=1`` was set before import; otherwise the torch reference in
:mod:`kernels.reference` as a fallback). Kernels know nothing of pools or requests.
"""
from .compact import compact_blocks
from .decode_attention import paged_decode_attention
from .prefill_attention import paged_prefill_attention
from .write_kv import write_kv

__all__ = ["write_kv", "paged_decode_attention", "paged_prefill_attention", "compact_blocks"]
