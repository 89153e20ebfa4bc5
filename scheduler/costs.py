"""Cost models: how much loop time an arena operation takes.

The loop measures every arena operation that maps, unmaps, compacts or swaps and hands an
:class:`ArenaOp` to its cost model, a callable ``(ArenaOp) -> seconds``. The default,
:func:`wall_clock_cost`, charges the measured wall-clock time; :class:`ModeledGPUCost`
charges a modeled GPU time (per-chunk map/unmap latency, compaction bytes over the device
bandwidth, swap bytes over the host link), which is what a replay on a machine without
the GPU it models needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ArenaOp:
    """One arena operation as the loop saw it.

    ``kind``: "resize", "shrink", "release", "swap_out" or "swap_in"; ``wall_s``: measured
    seconds; ``chunks_mapped`` / ``chunks_unmapped``: chunks it mapped / unmapped;
    ``chunk_bytes``; ``blocks_moved`` / ``bytes_moved``: compaction moves and the bytes they
    copied; ``bytes_copied``: bytes swapped between device and host.
    """

    kind: str
    wall_s: float
    chunks_mapped: int = 0
    chunks_unmapped: int = 0
    chunk_bytes: int = 0
    blocks_moved: int = 0
    bytes_moved: int = 0
    bytes_copied: int = 0


CostModel = Callable[[ArenaOp], float]


def wall_clock_cost(op: ArenaOp) -> float:
    """The measured wall-clock seconds of the operation."""
    return op.wall_s


@dataclass(frozen=True)
class ModeledGPUCost:
    """Modeled GPU seconds of an arena operation.

    ``map_s_per_chunk`` / ``unmap_s_per_chunk``: driver latency per chunk (cuMemCreate +
    cuMemMap + cuMemSetAccess, resp. cuMemUnmap + cuMemRelease, for a 2 MiB chunk: tens of
    microseconds); ``device_bandwidth``: bytes/s of a device-to-device copy counting each
    byte once (a compaction reads and writes each moved byte: ``2 * bytes / bandwidth``);
    ``host_bandwidth``: bytes/s between device and host for swaps; ``op_overhead_s``: a fixed
    cost per operation that did anything (a kernel launch, a sync).
    """

    map_s_per_chunk: float = 40e-6
    unmap_s_per_chunk: float = 30e-6
    device_bandwidth: float = 3.35e12
    host_bandwidth: float = 25e9
    op_overhead_s: float = 10e-6

    def __call__(self, op: ArenaOp) -> float:
        """Seconds charged for ``op``."""
        busy = (op.chunks_mapped or op.chunks_unmapped or op.bytes_moved or op.bytes_copied)
        return (op.chunks_mapped * self.map_s_per_chunk
                + op.chunks_unmapped * self.unmap_s_per_chunk
                + 2.0 * op.bytes_moved / self.device_bandwidth
                + op.bytes_copied / self.host_bandwidth
                + (self.op_overhead_s if busy else 0.0))
