"""Argument checks shared by the kernels: every failure names the argument it is about.

Checks here never synchronise with a device: values of CUDA tensors are not read.
"""
from __future__ import annotations

from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


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
