"""The one lock and the closed flag shared by an arena, its pools and its block tables.

Threading model: every public method of :class:`PagedArena`, :class:`Pool` and
:class:`BlockTables` takes the arena's re-entrant lock for its whole duration, so any number
of threads may call them; each call is atomic with respect to the others. A caller that needs
several calls to be atomic together (read a sequence's block ids, then write KV into them)
holds ``arena.lock`` around them. Kernels launched over the arena's views are the caller's
business: the lock orders the arena's own bookkeeping and compaction, not other work on the
device.
"""
from __future__ import annotations

import functools
import threading

from .errors import ArenaError


class ArenaClosed(ArenaError):
    """The arena was closed; no method may be called on it, its pools or its tables."""

    def __init__(self):
        super().__init__("arena is closed")


class Guard:
    """A re-entrant lock plus the closed flag; one per arena, shared by its pools and tables."""

    __slots__ = ("lock", "closed")

    def __init__(self):
        self.lock = threading.RLock()
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise ArenaClosed()


def guarded(method):
    """Run ``method`` under ``self._guard``'s lock, after checking the arena is open."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        guard = self._guard
        with guard.lock:
            if guard.closed:
                raise ArenaClosed()
            return method(self, *args, **kwargs)
    return wrapper
