"""Cost models: how much loop time an arena operation takes, and what it was spent on.

Every arena operation that changes a lease, maps, unmaps, compacts or swaps goes through
:class:`~scheduler.metered.MeteredArena`, which measures it and hands an :class:`ArenaOp`
to its cost model. A cost model answers two questions:

* ``model(op) -> seconds``: what the loop's clock is charged;
* ``model.breakdown(op, seconds) -> {part: seconds}``: the same seconds split into
  :data:`COST_PARTS` (map, unmap, compact, swap, lease), which the replay reports per part.

:class:`WallClockCost` (the default, :data:`wall_clock_cost`) charges the measured
wall-clock time and books a whole operation to the part its kind names;
:class:`ModeledGPUCost` charges a modeled GPU time (per-chunk map/unmap latency,
compaction bytes over the device bandwidth, swap bytes over the host link) and splits it
term by term, which is what a replay on a machine without the GPU it models needs.
A plain callable ``(ArenaOp) -> seconds`` is accepted wherever a cost model is
(:func:`as_cost_model` wraps it; it gets the by-kind breakdown).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .registry import Registry

#: The parts a charge is split into: driver map calls, driver unmap calls, compaction
#: (copies and launch), swap traffic to and from the host, and lease bookkeeping that
#: maps nothing (zero under the modeled cost).
COST_PARTS = ("map", "unmap", "compact", "swap", "lease")

#: ArenaOp kinds: "resize" (a lease raised; may map), "lease" (a lease lowered: maps
#: nothing), "static" (static's start-up mapping), "shrink", "release", "swap_out", "swap_in",
#: "premap" (a background mapper mapping ahead of need).
OP_KINDS = ("resize", "lease", "static", "shrink", "release", "swap_out", "swap_in", "premap")


@dataclass(frozen=True)
class ArenaOp:
    """One arena operation as the metered arena saw it.

    ``kind``: one of :data:`OP_KINDS`; ``wall_s``: measured seconds; ``chunks_mapped`` /
    ``chunks_unmapped``: chunks it mapped / unmapped; ``chunk_bytes``; ``blocks_moved`` /
    ``bytes_moved``: compaction moves and the bytes they copied; ``bytes_copied``: bytes
    swapped between device and host.
    """

    kind: str
    wall_s: float
    chunks_mapped: int = 0
    chunks_unmapped: int = 0
    chunk_bytes: int = 0
    blocks_moved: int = 0
    bytes_moved: int = 0
    bytes_copied: int = 0


def part_of_kind(op: ArenaOp) -> str:
    """The part of :data:`COST_PARTS` a whole operation belongs to when its cost cannot be
    split term by term (measured wall-clock time)."""
    if op.kind in ("swap_out", "swap_in"):
        return "swap"
    if op.kind == "shrink":
        return "compact"
    if op.kind == "release" or (op.chunks_unmapped and not op.chunks_mapped):
        return "unmap"
    if op.kind == "lease" or not op.chunks_mapped:
        return "lease"
    return "map"


class CostModel:
    """Base class of cost models: ``__call__`` charges, :meth:`breakdown` splits."""

    name = ""

    def __call__(self, op: ArenaOp) -> float:
        """Seconds charged to the loop's clock for ``op``."""
        raise NotImplementedError

    def breakdown(self, op: ArenaOp, seconds: float) -> dict[str, float]:
        """``seconds`` (what ``self(op)`` returned) split into :data:`COST_PARTS`; the
        default books it all to :func:`part_of_kind`."""
        return {part_of_kind(op): seconds}


class WallClockCost(CostModel):
    """The measured wall-clock seconds of the operation (arenas on a real device)."""

    name = "wall-clock"

    def __call__(self, op: ArenaOp) -> float:
        return op.wall_s


#: The default cost model.
wall_clock_cost = WallClockCost()


@dataclass(frozen=True)
class ModeledGPUCost(CostModel):
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

    name = "modeled-gpu"

    def terms(self, op: ArenaOp) -> dict[str, float]:
        """The modeled seconds of each part, before the per-operation overhead."""
        return {"map": op.chunks_mapped * self.map_s_per_chunk,
                "unmap": op.chunks_unmapped * self.unmap_s_per_chunk,
                "compact": 2.0 * op.bytes_moved / self.device_bandwidth,
                "swap": op.bytes_copied / self.host_bandwidth}

    def __call__(self, op: ArenaOp) -> float:
        """Seconds charged for ``op``: the sum of :meth:`terms` plus the overhead when the
        operation did anything."""
        busy = (op.chunks_mapped or op.chunks_unmapped or op.bytes_moved or op.bytes_copied)
        t = self.terms(op)
        return (t["map"] + t["unmap"] + t["compact"] + t["swap"]
                + (self.op_overhead_s if busy else 0.0))

    def breakdown(self, op: ArenaOp, seconds: float) -> dict[str, float]:
        """Term by term; the per-operation overhead goes to what the operation is for (a
        shrink's unmaps count as unmap, its launch as compact)."""
        parts = self.terms(op)
        kind = {"shrink": "compact", "release": "unmap", "swap_out": "swap",
                "swap_in": "swap"}.get(op.kind, "map")
        parts[kind] += seconds - sum(parts.values())
        return parts


class _CallableCost(CostModel):
    """A plain ``(ArenaOp) -> seconds`` callable as a :class:`CostModel`."""

    def __init__(self, fn: Callable[[ArenaOp], float]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "callable")

    def __call__(self, op: ArenaOp) -> float:
        return self.fn(op)


def _adapt(spec: Any) -> CostModel:
    return spec if isinstance(spec, CostModel) else _CallableCost(spec)


#: Cost models by name; a :class:`CostModel` or a callable ``(ArenaOp) -> seconds`` is
#: accepted (a callable gets the by-kind breakdown).
COST_MODELS: Registry[CostModel] = Registry(
    "cost_model", {"wall-clock": WallClockCost, "modeled-gpu": ModeledGPUCost},
    accepts=callable, adapt=_adapt)


def as_cost_model(spec: CostModel | str | Callable[[ArenaOp], float] | None) -> CostModel:
    """A :class:`CostModel` from ``None`` (wall clock), a name in :data:`COST_MODELS`, a
    cost model, or a callable ``(ArenaOp) -> seconds``. TypeError otherwise."""
    return wall_clock_cost if spec is None else COST_MODELS.resolve(spec)
