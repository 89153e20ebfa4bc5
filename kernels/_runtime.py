"""Where a kernel call runs: compiled Triton, Triton's interpreter, or the torch fallback.

``TRITON_INTERPRET`` is read once, at import, because Triton reads it when ``@triton.jit``
decorates: flipping it later cannot change how the kernels were built.
"""
from __future__ import annotations

import os

import torch

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when these tensors should go through a Triton launch.

    CUDA tensors always do (compiled, or interpreted when ``TRITON_INTERPRET=1``); CPU
    tensors only under the interpreter. Otherwise callers use the documented torch fallback
    (the reference implementation in :mod:`kernels.reference`).
    """
    if all(t.is_cuda for t in tensors):
        return True
    return INTERPRET and all(t.device.type == "cpu" for t in tensors)
