"""KVSpec: the shape of one model's KV cache, and the byte sizes that follow from it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KVSpec:
    """Per-model KV-cache geometry.

    A block holds ``block_size`` tokens of K and V for every layer, laid out
    ``[num_layers, 2, block_size, num_kv_heads, head_dim]`` (one contiguous run of bytes).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 16
    dtype: torch.dtype = torch.float16

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of float16, bfloat16, float32, got {self.dtype}")

    @property
    def element_size(self) -> int:
        """Bytes per element of ``dtype``."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: ``(num_layers, 2, block_size, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (all layers, K and V)."""
        return self.token_bytes * self.block_size

    def blocks_for(self, tokens):
        """Blocks needed to hold ``tokens`` tokens: ``ceil(tokens / block_size)``.

        Accepts an int (returns int) or an integer numpy array (returns int64 array).
        """
        if isinstance(tokens, np.ndarray):
            return -(-tokens.astype(np.int64) // self.block_size)
        return -(-int(tokens) // self.block_size)

    def chunk_bytes_for(self, granularity: int) -> int:
        """Smallest multiple of ``granularity`` bytes that holds a whole number of blocks."""
        return math.lcm(int(granularity), self.block_bytes)
