"""A background mapper: keeps an arena's spare (mapped, unleased) blocks inside a band, on
its own thread, so the thread that schedules model steps rarely waits on the driver.

The scheduling thread says what it expects to need (:meth:`BackgroundMapper.set_target`:
a low and a high mark, in blocks) and goes on; the mapper thread maps chunks until the
spare reaches the low mark and unmaps free chunks (in batches of ``chunks_per_lock``, one
device wait per batch) when the spare passes the high mark, down to the low mark. A new
target is taken between batches, so a map that is needed never waits behind a long
release. The band is the hysteresis: a
spare that wobbles inside it costs no driver call. A lease raised into spare blocks needs
no driver call; only a raise past the spare (a miss) maps on the caller's thread.

Threads: the mapper takes ``arena.lock`` for each driver batch of at most
``chunks_per_lock`` chunks, so the scheduling thread waits at most one batch when it needs
the arena. On CUDA an unmap waits for the work already queued on the device (the step in
flight) before the memory goes; that wait happens here, not on the scheduling thread
(holding the lock, so a scheduling thread that needs the arena then waits with it).

Errors: an error on the mapper thread (other than the arena being closed) is kept and
raised by the next :meth:`BackgroundMapper.set_target` / :meth:`wait` call, after which the
mapper takes no more targets; :meth:`close` does not raise it.
"""
from __future__ import annotations

import threading
import time

from ._checks import as_int
from ._guard import ArenaClosed


class BackgroundMapper:
    """Maps ahead of need and unmaps behind it on a daemon thread (see the module docstring).

    Args:
        arena: the :class:`~arena.PagedArena` to keep spare blocks in.
        chunks_per_lock: chunks mapped per hold of ``arena.lock`` (>= 1).

    Attributes (read any time; updated by the mapper thread): ``busy_s`` wall-clock seconds
    the thread spent in arena calls; ``chunks_mapped`` / ``chunks_unmapped`` it made;
    ``batches`` arena calls it made.
    """

    #: chunks per batch (per hold of the arena lock) unless told otherwise
    DEFAULT_CHUNKS_PER_LOCK = 8

    def __init__(self, arena, *, chunks_per_lock: int = DEFAULT_CHUNKS_PER_LOCK) -> None:
        self.arena = arena
        self.chunks_per_lock = as_int(chunks_per_lock, "chunks_per_lock", minimum=1)
        self._cond = threading.Condition()
        self._low = 0
        self._high = 0
        self._limit: int | None = None
        self._pending = False
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self.busy_s = 0.0
        self.chunks_mapped = 0
        self.chunks_unmapped = 0
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="kvarena-mapper", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller's side
    def set_target(self, low_blocks: int, high_blocks: int | None = None,
                   limit_blocks: int | None = None) -> None:
        """Keep at least ``low_blocks`` spare blocks mapped and unmap free chunks once the
        spare exceeds ``high_blocks`` (default ``low_blocks``), never mapping beyond
        ``limit_blocks`` mapped blocks in all (a cap; leases that grow meanwhile count).
        Returns at once; raises the mapper thread's last error, if any. ValueError when
        high < low."""
        low = as_int(low_blocks, "low_blocks", minimum=0)
        high = low if high_blocks is None else as_int(high_blocks, "high_blocks", minimum=0)
        if high < low:
            raise ValueError(f"high_blocks ({high}) must be >= low_blocks ({low})")
        if limit_blocks is not None:
            limit_blocks = as_int(limit_blocks, "limit_blocks", minimum=0)
        with self._cond:
            self._raise_error()
            if self._closed:
                raise RuntimeError("the mapper is closed")
            self._low, self._high, self._limit = low, high, limit_blocks
            self._pending = True
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the mapper has acted on the last target (True), or ``timeout``
        seconds passed (False). Raises the mapper thread's error, if any."""
        with self._cond:
            done = self._cond.wait_for(lambda: not (self._pending or self._busy)
                                       or self._error is not None or self._closed, timeout)
            self._raise_error()
            return done

    def close(self) -> None:
        """Stop the thread (after its current batch). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "BackgroundMapper":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _raise_error(self) -> None:
        err = self._error
        if err is not None:
            self._error = None
            self._closed = True
            raise err

    # ------------------------------------------------------------------ mapper thread
    def _run(self) -> None:
        if self.arena.device.type == "cuda":
            import torch

            # driver calls from this thread need the arena's device current here too
            torch.cuda.set_device(self.arena.device)
        cond = self._cond
        while True:
            with cond:
                cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                low, high, limit = self._low, self._high, self._limit
                self._pending = False
                self._busy = True
            try:
                self._reach(low, high, limit)
            except ArenaClosed:
                with cond:
                    self._closed = True
            except BaseException as exc:   # handed to the caller's thread
                with cond:
                    self._error = exc
            finally:
                with cond:
                    self._busy = False
                    cond.notify_all()

    def _reach(self, low: int, high: int, limit: int | None = None) -> None:
        # One batch of at most chunks_per_lock chunks per lock hold; a newer target is
        # taken between batches, so a long release never holds up a map that is needed.
        arena = self.arena
        releasing = False
        while True:
            with self._cond:
                if self._pending or self._closed:
                    return   # a newer target (or close) supersedes this one
            t0 = time.perf_counter()
            with arena.lock:
                spare = arena.spare_blocks
                want = low if limit is None else min(low, max(limit - arena.leased_blocks, 0))
                n = 0
                if spare < want:
                    # whole chunks only while they stay under the limit
                    room = None if limit is None else max(
                        (limit - arena.mapped_blocks) // arena.blocks_per_chunk, 0)
                    n = arena.map_spare(want, self.chunks_per_lock if room is None
                                        else min(room, self.chunks_per_lock))
                    self.chunks_mapped += n
                elif spare > high or (releasing and spare > low):
                    # past the band: give back down to the low mark (hysteresis)
                    releasing = True
                    n = arena.release_free_chunks(keep_blocks=low,
                                                  max_chunks=self.chunks_per_lock)
                    self.chunks_unmapped += n
            self.busy_s += time.perf_counter() - t0
            self.batches += 1
            if n == 0:
                return
