"""What every benchmark shares: device description, the copy-bandwidth yardstick, JSON out.

Results are written under ``bench/results/`` as JSON carrying the device, library versions
and date, so a number never travels without the conditions it was measured under.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment(device: str | torch.device = "cuda") -> dict[str, Any]:
    """Device name, library versions and the UTC date/time, as a JSON-ready dict."""
    import numpy
    import triton

    dev = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "host": platform.machine(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info.update(device=props.name, device_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})")
    return info


def time_fn(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median seconds per call of ``fn``: CUDA events through triton's do_bench on a GPU,
    a host clock (median of repeats) on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    import statistics
    import time

    fn()
    times = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written,
    measured now on ``device`` with a plain ``Tensor.copy_`` of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` plus :func:`environment` as ``<out_dir>/<name>.json``; returns the path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"environment": environment(dev), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return path
