"""Mapping ahead of need: PagedArena.map_spare / release_free_chunks(keep_blocks), and the
BackgroundMapper thread that drives them (host backend)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from arena import BackgroundMapper, HostMemory, PagedArena
from arena_helpers import PAGE, check_invariants, snapshot, assert_same, tiny_arena, tiny_spec

BPC = 16   # blocks per chunk of tiny_arena


def test_map_spare_maps_whole_chunks_up_to_the_target_without_leasing():
    a = tiny_arena(8)
    p = a.pool("decode")
    p.resize(10)                           # one chunk, 6 spare
    assert a.spare_blocks == 6
    assert a.map_spare(6) == 0             # already there: no driver call
    assert a.map_spare(7) == 1 and a.spare_blocks == 22
    assert a.map_spare(60, max_chunks=2) == 2 and a.mapped_chunks == 4
    assert p.lease == 10 and a.leased_blocks == 10
    assert a.map_spare(10_000) == 4 and a.mapped_chunks == 8   # the range is the limit
    assert a.map_spare(10_000) == 0
    check_invariants(a)
    a.close()


def test_map_spare_stops_at_the_device_limit_and_survives_a_refusing_device():
    a = tiny_arena(8, limit_chunks=3)
    assert a.map_spare(100) == 3 and a.mapped_chunks == 3

    class Refusing(HostMemory):
        def free_bytes(self):      # says yes ...
            return 8 * PAGE

        def map(self, offset, nbytes):   # ... then refuses
            from arena import ArenaOutOfMemory
            raise ArenaOutOfMemory("injected", requested_bytes=nbytes, free_bytes=0)

    b = PagedArena(tiny_spec(), 8 * PAGE, backend=Refusing(8 * PAGE, granularity=PAGE))
    before = snapshot(b)
    assert b.map_spare(20) == 0
    assert_same(before, snapshot(b))
    a.close()
    b.close()


@pytest.mark.parametrize("args, exc", [((-1,), ValueError), ((1.5,), TypeError),
                                       ((True,), TypeError), ((4, -1), ValueError)])
def test_map_spare_refuses_bad_arguments_before_mapping(args, exc):
    a = tiny_arena(4)
    with pytest.raises(exc, match="spare_blocks|max_chunks"):
        a.map_spare(*args)
    assert a.mapped_chunks == 0
    a.close()


def test_release_free_chunks_keeps_the_spare_asked_for():
    a = tiny_arena(8)
    p = a.pool("decode")
    p.resize(8 * BPC)                      # everything mapped
    ids = p.allocate(3)                    # lowest blocks: chunk 0
    p.resize(3)
    assert a.spare_blocks == 8 * BPC - 3
    assert a.release_free_chunks(keep_blocks=2 * BPC, max_chunks=2) == 2
    assert a.mapped_chunks == 6
    assert a.release_free_chunks(keep_blocks=2 * BPC) == 3
    assert a.mapped_chunks == 3 and a.spare_blocks >= 2 * BPC
    assert a.release_free_chunks(keep_blocks=0) == 2
    assert a.mapped_chunks == 1            # chunk 0 holds the live blocks
    with pytest.raises(ValueError, match="keep_blocks"):
        a.release_free_chunks(keep_blocks=-1)
    p.free(ids)
    check_invariants(a)
    a.close()


def test_background_mapper_reaches_its_band_and_gives_back_above_it():
    a = tiny_arena(8)
    p = a.pool("prefill")
    with BackgroundMapper(a, chunks_per_lock=1) as m:
        m.set_target(40)                   # 3 chunks, mapped one per lock hold
        assert m.wait(5)
        assert a.spare_blocks >= 40 and a.mapped_chunks == 3
        assert m.chunks_mapped == 3 and m.busy_s > 0
        p.resize(40)                       # takes the spare: no mapping on this thread
        assert a.mapped_chunks == 3
        p.resize(0)
        m.set_target(0, 2 * BPC)           # 48 spare > 32: back down to 0
        assert m.wait(5)
        assert a.mapped_chunks == 0 and m.chunks_unmapped == 3
        m.set_target(16, 64)               # inside the band: nothing to do
        assert m.wait(5) and a.mapped_chunks == 1
        m.set_target(0, 64)
        assert m.wait(5) and a.mapped_chunks == 1   # 16 spare <= 64: kept (hysteresis)
    check_invariants(a)
    a.close()


def test_background_mapper_refuses_a_band_upside_down_and_bad_targets():
    a = tiny_arena(4)
    with BackgroundMapper(a) as m:
        with pytest.raises(ValueError, match="high_blocks"):
            m.set_target(10, 5)
        with pytest.raises(ValueError, match="low_blocks"):
            m.set_target(-1)
        with pytest.raises(TypeError, match="low_blocks"):
            m.set_target(2.0)
    with pytest.raises(RuntimeError, match="closed"):
        m.set_target(1)
    m.close()                              # idempotent
    a.close()


def test_background_mapper_hands_its_error_to_the_caller():
    class Broken(HostMemory):
        def map(self, offset, nbytes):
            raise RuntimeError("driver exploded")

    a = PagedArena(tiny_spec(), 4 * PAGE, backend=Broken(4 * PAGE, granularity=PAGE))
    m = BackgroundMapper(a)
    m.set_target(8)
    with pytest.raises(RuntimeError, match="driver exploded"):
        m.wait(5)
    with pytest.raises(RuntimeError, match="closed"):
        m.set_target(8)                    # it stopped
    m.close()
    a.close()


def test_background_mapper_stops_quietly_when_the_arena_closes():
    a = tiny_arena(4)
    m = BackgroundMapper(a)
    m.set_target(16)
    assert m.wait(5)
    a.close()
    m.set_target(32)                       # its next call finds the arena closed
    assert m.wait(5)
    m.close()
    assert not m._thread.is_alive()


def test_background_mapper_and_an_allocating_thread_keep_the_books_straight():
    """The scheduling thread leases, allocates and frees while the mapper maps and unmaps
    under the same lock: the invariants hold after every call, nothing is lost."""
    a = tiny_arena(16)
    p = a.pool("decode")
    rng = np.random.default_rng(0)
    held: list[np.ndarray] = []
    stop = time.perf_counter() + 1.0
    with BackgroundMapper(a, chunks_per_lock=2) as m:
        ops = 0
        while time.perf_counter() < stop:
            m.set_target(int(rng.integers(0, 4 * BPC)), int(rng.integers(4 * BPC, 8 * BPC)))
            with a.lock:
                if held and rng.random() < 0.45:
                    ids = held.pop(int(rng.integers(len(held))))
                    p.free(ids)
                    p.resize(p.num_owned)
                else:
                    n = int(rng.integers(1, 12))
                    if a.available_blocks() >= n:
                        p.resize(p.num_owned + n)
                        held.append(p.allocate(n))
                check_invariants(a)
            ops += 1
        assert m.wait(5)
    assert ops > 50
    assert sum(x.size for x in held) == p.num_owned
    check_invariants(a)
    a.close()


def test_wait_times_out_while_the_mapper_is_held_up():
    a = tiny_arena(4)
    m = BackgroundMapper(a)
    with a.lock:                           # the mapper cannot get the arena
        m.set_target(8)
        assert m.wait(0.05) is False
    assert m.wait(5)
    assert a.spare_blocks >= 8
    m.close()
    a.close()


def test_close_from_several_threads_is_safe():
    a = tiny_arena(4)
    m = BackgroundMapper(a)
    ts = [threading.Thread(target=m.close) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not m._thread.is_alive()
    a.close()


def test_background_mapper_never_maps_past_its_limit():
    a = tiny_arena(8)
    p = a.pool("decode")
    with BackgroundMapper(a) as m:
        m.set_target(8 * BPC, 8 * BPC, limit_blocks=3 * BPC)
        assert m.wait(5)
        assert a.mapped_chunks == 3
        p.resize(2 * BPC + 4)                  # leases grow: the limit still holds
        m.set_target(4 * BPC, 8 * BPC, limit_blocks=3 * BPC)
        assert m.wait(5)
        assert a.mapped_chunks == 3
        with pytest.raises(ValueError, match="limit_blocks"):
            m.set_target(1, 2, limit_blocks=-1)
    a.close()
