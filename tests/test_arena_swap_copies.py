"""PagedArena(swap_copies=False): swaps for simulations whose blocks hold no KV."""
from __future__ import annotations

import pytest
import torch

from arena_helpers import tiny_arena


def test_copy_free_swap_keeps_no_bytes_and_writes_nothing():
    a = tiny_arena(4, swap_copies=False)
    p = a.pool("decode")
    p.resize(8)
    ids = p.allocate(5)
    before = a.blocks[torch.from_numpy(ids)].clone()
    data = a.swap_out(ids)
    assert tuple(data.shape) == (5, *a.spec.block_shape) and data.dtype == a.spec.dtype
    assert data.untyped_storage().nbytes() <= data.element_size()    # nothing held
    a.blocks[torch.from_numpy(ids)] = 7.0
    a.swap_in(data, ids)                                              # copies nothing
    assert bool((a.blocks[torch.from_numpy(ids)] == 7.0).all())
    with pytest.raises(ValueError, match="data must be"):
        a.swap_in(data[:2], ids)                                      # still checked
    assert before.shape == data.shape
    a.close()


def test_default_swap_round_trips_the_bytes():
    a = tiny_arena(4)
    p = a.pool("decode")
    p.resize(8)
    ids = p.allocate(3)
    a.blocks[torch.from_numpy(ids)] = torch.arange(3.0).view(3, 1, 1, 1, 1, 1)
    data = a.swap_out(ids)
    a.blocks[torch.from_numpy(ids)] = 0.0
    a.swap_in(data, ids)
    assert a.blocks[torch.from_numpy(ids)].flatten(1).mean(1).tolist() == [0.0, 1.0, 2.0]
    a.close()
