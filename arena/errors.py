"""Exceptions raised by the arena. Bad arguments raise ValueError/TypeError instead."""
from __future__ import annotations


class ArenaError(Exception):
    """A misuse of the arena's state (double free, foreign block, exhausted lease...)."""


class LeaseExceeded(ArenaError):
    """A pool was asked for more blocks than its lease allows."""


class ArenaOutOfMemory(ArenaError):
    """The device could not supply the memory asked for; nothing was mapped by the call.

    Attributes: ``requested_bytes`` (what the call needed mapped) and ``free_bytes`` (what the
    device, or the arena's reserved range, could still supply at that moment).
    """

    def __init__(self, message: str, *, requested_bytes: int, free_bytes: int):
        super().__init__(f"{message} (requested {requested_bytes} B, free {free_bytes} B)")
        self.requested_bytes = int(requested_bytes)
        self.free_bytes = int(free_bytes)


class ChunkReleaseFailed(ArenaError):
    """A chunk's virtual range was unmapped but returning its physical memory failed.

    The chunk counts as unmapped (nothing reaches it through the arena any more); the
    backend keeps the handle and tries to release it again when it is closed."""
