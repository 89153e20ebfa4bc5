"""Argument coercion shared by the arena's modules: block ids and plain integers.

One place, so every entry point rejects the same inputs with the same message: an error
names the argument and is raised before anything changes.
"""
from __future__ import annotations

import numpy as np


def as_int(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int; TypeError unless it is an integer (bool, float and numpy
    floats are refused, numpy integers accepted), ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def as_block_ids(block_ids, num_blocks: int, name: str = "block_ids", *,
                 unique: bool = True) -> np.ndarray:
    """``block_ids`` (int array-like, any shape) as a flat int64 array of ids in
    ``[0, num_blocks)``; with ``unique``, no id may repeat.

    TypeError for non-integer values, ValueError for ids out of range or repeated.
    """
    ids = np.asarray(block_ids)
    if ids.dtype == object or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64).reshape(-1)
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_blocks:
            raise ValueError(f"{name} holds ids outside [0, {num_blocks}): got [{lo}, {hi}]")
        if unique and np.unique(ids).size != ids.size:
            raise ValueError(f"{name} repeats a block id")
    return ids
