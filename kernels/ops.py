"""The kernels' torch custom ops (namespace ``kvarena``), re-exported in one place.

Each kernel module registers its own op the same way: the op mutates tensors its caller
passes in and returns nothing (``write_kv`` writes ``kv_cache``; the attention ops write
``out``; ``compact_blocks`` writes ``blocks`` and ``block_tables``), launches without
validating (the public function validated once), and has a fake implementation that does
nothing, so torch.compile traces each call as one opaque node and CUDA graphs capture it
like any other op. This module only re-exports; it is imported by nothing in ``kernels``.
"""
from ._checks import OP_NAMESPACE, prepare_out
from .compact import compact_blocks_op
from .decode_attention import paged_decode_attention_op
from .prefill_attention import paged_prefill_attention_op
from .write_kv import write_kv_op

__all__ = ["OP_NAMESPACE", "prepare_out", "write_kv_op", "paged_decode_attention_op",
           "paged_prefill_attention_op", "compact_blocks_op"]
