"""A closed arena: one clear error from every method of the arena, its pools and its tables;
views kept from before the close cannot crash the process (on the host they read zeros and
the reservation goes with the last of them)."""
import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

from arena import ArenaError, HostMemory
from tests.arena_helpers import PAGE, tiny_arena

CLOSED = "arena is closed"


@pytest.fixture
def closed():
    a = tiny_arena(chunks=4)
    p, d = a.pool("p"), a.pool("d")
    p.resize(8)
    ids = p.allocate(4)
    a.tables.add(0)
    a.tables.append(0, ids)
    a.close()
    return a, p, d, ids


CALLS = {
    "resize": lambda a, p, d, ids: p.resize(4),
    "allocate": lambda a, p, d, ids: p.allocate(1),
    "free": lambda a, p, d, ids: p.free(ids[:1]),
    "transfer": lambda a, p, d, ids: p.transfer(ids[:1], d),
    "owned": lambda a, p, d, ids: p.owned(),
    "pool": lambda a, p, d, ids: a.pool("new"),
    "pools": lambda a, p, d, ids: a.pools,
    "kv_cache": lambda a, p, d, ids: a.kv_cache(0),
    "blocks": lambda a, p, d, ids: a.blocks,
    "backend": lambda a, p, d, ids: a.backend,
    "mapped_bytes": lambda a, p, d, ids: a.mapped_bytes,
    "mapped_blocks": lambda a, p, d, ids: a.mapped_blocks,
    "mapped_chunks": lambda a, p, d, ids: a.mapped_chunks,
    "leased_blocks": lambda a, p, d, ids: a.leased_blocks,
    "used_blocks": lambda a, p, d, ids: a.used_blocks,
    "available_blocks": lambda a, p, d, ids: a.available_blocks(),
    "stats": lambda a, p, d, ids: a.stats(),
    "plan_shrink": lambda a, p, d, ids: a.plan_shrink(),
    "shrink": lambda a, p, d, ids: a.shrink(),
    "release_free_chunks": lambda a, p, d, ids: a.release_free_chunks(),
    "swap_out": lambda a, p, d, ids: a.swap_out(ids),
    "swap_in": lambda a, p, d, ids: a.swap_in(torch.zeros(1, *a.spec.block_shape), ids[:1]),
    "tables.add": lambda a, p, d, ids: a.tables.add(1),
    "tables.append": lambda a, p, d, ids: a.tables.append(0, ids[:1]),
    "tables.truncate": lambda a, p, d, ids: a.tables.truncate(0, 1),
    "tables.blocks": lambda a, p, d, ids: a.tables.blocks(0),
    "tables.remove": lambda a, p, d, ids: a.tables.remove(0),
    "tables.row": lambda a, p, d, ids: a.tables.row(0),
    "tables.rows": lambda a, p, d, ids: a.tables.rows([0]),
    "tables.device_table": lambda a, p, d, ids: a.tables.device_table,
    "tables.sync": lambda a, p, d, ids: a.tables.sync(),
    "tables.len": lambda a, p, d, ids: len(a.tables),
    "tables.contains": lambda a, p, d, ids: 0 in a.tables,
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_method_of_a_closed_arena_raises_one_clear_error(closed, name):
    with pytest.raises(ArenaError, match=f"^{CLOSED}$"):
        CALLS[name](*closed)


def test_close_is_idempotent_and_reports_closed(closed):
    a = closed[0]
    assert a.closed
    a.close()
    assert a.closed


def test_kept_view_reads_zeros_after_close_and_the_range_goes_with_it():
    a = tiny_arena(chunks=4)
    p = a.pool("p")
    p.resize(16)
    ids = p.allocate(16)
    kv, blocks = a.kv_cache(0), a.blocks
    blocks[torch.from_numpy(ids)] = 7.0
    reservation = weakref.ref(a.backend._mmap)
    a.close()
    assert float(kv.sum()) == 0.0 and float(blocks.abs().sum()) == 0.0  # pages returned
    del a, p
    gc.collect()
    assert reservation() is not None  # the views still hold the range
    del kv, blocks
    gc.collect()
    assert reservation() is None  # ... and it goes with the last of them


def test_host_memory_close_returns_every_page_even_those_written_while_unmapped():
    m = HostMemory(4 * PAGE, granularity=PAGE)
    view = m.tensor()
    view[3 * PAGE:] = 1  # a write into an unmapped chunk commits pages on the host
    m.close()
    assert int(view.sum()) == 0
    with pytest.raises(ArenaError, match=CLOSED):
        m.map(0, PAGE)


def test_use_after_close_does_not_kill_the_process():
    """The case that crashed (SIGSEGV) before; in a subprocess so a regression cannot take
    pytest down with it."""
    code = textwrap.dedent("""
        import torch
        from tests.arena_helpers import tiny_arena
        a = tiny_arena(chunks=2, compact_fn=lambda *args: None)  # no kernel import: faster
        p = a.pool("p"); p.resize(4); ids = p.allocate(4)
        kv = a.kv_cache(0)
        kv[torch.from_numpy(ids)] = 3.0
        a.close()
        print(float(kv.sum()), float(kv[ids[0]].max()))
        kv[ids[0]] = 5.0   # writing is harmless too: private pages, gone with the view
        print(float(kv.sum()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    lines = out.stdout.split()
    assert lines[:2] == ["0.0", "0.0"]
    assert float(lines[2]) == 5.0 * np.prod(kv_shape_of_one_block())


def kv_shape_of_one_block():
    from tests.arena_helpers import tiny_spec
    s = tiny_spec()
    return (2, s.block_size, s.num_kv_heads, s.head_dim)
