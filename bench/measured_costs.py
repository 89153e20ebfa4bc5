"""Measured arena costs for a device preset: map/unmap seconds per chunk from a GPU run.

``python -m bench.bench_arena`` on a GPU (step ``bench_arena`` of ``scripts/gpu_check.sh``)
writes ``arena.json``: ``environment.device`` (the CUDA device name, e.g. "NVIDIA H200"),
``environment.date_utc`` and ``map_unmap`` with ``map_s_median`` / ``unmap_s_median``
(seconds per 2 MiB chunk, one chunk per driver call) and ``chunk_bytes``. Whoever runs the
check commits its ``$OUT`` folder under ``bench/results/gpu/<preset>-<YYYYMMDD>/`` (any
folder under ``bench/results/`` is searched). The host replay then charges map/unmap at
those medians for that device preset instead of the assumed constants of
:class:`scheduler.costs.ModeledGPUCost`, and says which file it used.

Device names are matched to presets by :data:`DEVICE_NAME_PATTERNS`; a device without a
preset of the same memory and bandwidth class (H100 PCIe or NVL, A100 40GB or PCIe) matches
none and its figures are not used.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
#: Where GPU results are committed (searched recursively for ``arena.json``).
RESULTS_ROOT = _REPO / "bench" / "results"

#: (regular expression on the CUDA device name, device preset of scheduler.latency.DEVICES).
#: Names as torch.cuda.get_device_properties reports them.
DEVICE_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bH200\b", "h200"),                                # "NVIDIA H200", "NVIDIA H200 NVL"
    (r"\bH100\b.*\b(SXM|HBM3)\b", "h100-sxm"),            # "NVIDIA H100 80GB HBM3"
    (r"\bA100-SXM4-80GB\b", "a100-80g"),                  # "NVIDIA A100-SXM4-80GB"
    (r"\bL40S\b", "l40s"),                                # "NVIDIA L40S"
)


def preset_for_device_name(name: str) -> str | None:
    """The device preset a CUDA device name belongs to, or None (see
    :data:`DEVICE_NAME_PATTERNS`)."""
    if not isinstance(name, str):
        return None
    for pattern, preset in DEVICE_NAME_PATTERNS:
        if re.search(pattern, name):
            return preset
    return None


@dataclass(frozen=True)
class MeasuredArenaCost:
    """Map/unmap seconds per chunk measured on a GPU, and where they come from."""

    path: str
    date_utc: str
    device_name: str
    map_s_per_chunk: float
    unmap_s_per_chunk: float
    chunk_bytes: int

    def describe(self) -> dict:
        """JSON-ready source fields for replay.json."""
        return {"measured_file": self.path, "measured_date_utc": self.date_utc,
                "measured_device": self.device_name,
                "measured_chunk_bytes": self.chunk_bytes}


def _read(path: Path) -> MeasuredArenaCost | None:
    """The figures of one ``arena.json``, or None when it is unreadable, failed or partial."""
    try:
        doc = json.loads(path.read_text())
        env, mu = doc["environment"], doc["map_unmap"]
        m, u = float(mu["map_s_median"]), float(mu["unmap_s_median"])
        chunk = int(mu.get("chunk_bytes", 2 << 20))
        name, date = str(env["device"]), str(env.get("date_utc", ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (math.isfinite(m) and math.isfinite(u) and m > 0 and u > 0):
        return None
    try:
        shown = str(path.resolve().relative_to(_REPO))   # repository-relative when inside
    except ValueError:
        shown = str(path)
    return MeasuredArenaCost(shown, date, name, m, u, chunk)


def find_measured_arena_cost(device_preset: str,
                             root: str | Path | None = RESULTS_ROOT) -> MeasuredArenaCost | None:
    """The newest (by ``environment.date_utc``) measured map/unmap figures under ``root``
    whose device maps to ``device_preset``; None when there are none or ``root`` is None.
    Files that do not parse or hold an error row instead of figures are skipped."""
    if root is None:
        return None
    root = Path(root)
    if not root.is_dir():
        return None
    found = [c for p in sorted(root.rglob("arena.json"))
             if (c := _read(p)) is not None
             and preset_for_device_name(c.device_name) == device_preset]
    return max(found, key=lambda c: c.date_utc) if found else None
