"""What every benchmark shares: device description, kernel timing, the copy-bandwidth
yardstick, and JSON results written as they are measured.

Results are JSON documents carrying the device, library versions and date, so a number
never travels without the conditions it was measured under. :class:`ResultFile` rewrites
its document (atomically) after every row, so a benchmark killed half-way leaves every row
measured so far in a valid file. The folder is ``$OUT`` when set (the lent GPU machine's
folder that comes back), else ``bench/results/``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Distributions whose versions every result records: a name, or alternatives of which the
#: installed ones are recorded ("not installed" when none is).
VERSIONED = ("torch", "triton", "numpy", ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
             ("cuda-bindings", "cuda-python"))


def bench_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every kernel benchmark takes: ``--out`` (results
    folder) and ``--tiny`` (a CPU dry run through Triton's interpreter)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true", help="the smallest case on CPU through "
                   "Triton's interpreter: a dry run of the plumbing, numbers meaningless")
    p.add_argument("--out", default=None, help="results folder (default: $OUT when set, "
                   "else bench/results)")
    return p


def results_dir(out_dir: str | os.PathLike | None = None) -> Path:
    """Where results go: ``out_dir`` when given, else ``$OUT`` when set, else
    :data:`RESULTS_DIR`."""
    if out_dir is not None:
        return Path(out_dir)
    env = os.environ.get("OUT")
    return Path(env) if env else RESULTS_DIR


def _versions() -> dict[str, str]:
    found = {}
    for entry in VERSIONED:
        names = (entry,) if isinstance(entry, str) else entry
        for name in names:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        if not any(n in found for n in names):
            found[names[0]] = "not installed"
    return found


def _driver() -> dict[str, str]:
    """NVIDIA driver version and device name from nvidia-smi (empty without one)."""
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    line = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""
    if "," not in line:
        return {}
    version, name = (x.strip() for x in line.split(",", 1))
    return {"driver": version, "nvidia_smi_name": name}


def environment(device: str | torch.device = "cuda") -> dict[str, Any]:
    """Device name, library and driver versions and the UTC date/time, as a JSON-ready dict."""
    dev = torch.device(device)
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": _versions(),
        "torch": torch.__version__,
        "host": platform.machine(),
    }
    import numpy
    info["numpy"] = numpy.__version__
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency
        pass
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        info.update(device=props.name, device_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", **_driver())
    else:
        info.update(device=f"cpu ({platform.processor() or platform.machine()})")
    return info


def _host_median(fn: Callable[[], Any], rep_ms: float) -> float:
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fn(fn: Callable[[], Any], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median seconds per call of ``fn`` as launched eagerly: CUDA events through triton's
    do_bench on a GPU (launch gaps included), a host clock (median of at least 3 calls
    after one warm-up, within about ``rep_ms``) on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e-3
    return _host_median(fn, rep_ms)


def host_call_seconds(fn: Callable[[], Any], calls: int = 20, trials: int = 5) -> float:
    """Host wall time of one call of ``fn`` (seconds, median over ``trials`` of ``calls``
    back-to-back calls, device synchronized between trials, not within): what the launch
    path costs the CPU. Few enough calls that the device's launch queue never fills, so a
    long kernel does not stretch it."""
    cuda = torch.cuda.is_available()
    fn()
    per_call = []
    for _ in range(trials):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls)
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(per_call)


def time_kernel(fn: Callable[[], Any], *, rep_ms: float = 50,
                graph_rep_ms: float = 20) -> dict[str, Any]:
    """Time ``fn`` three ways, as a JSON-ready dict (seconds per call):

    - ``kernel_s``: median over CUDA-graph replays (``triton.testing.do_bench_cudagraph``
      with ``graph_rep_ms``; each replay runs as many calls as fill that time),
      i.e. device time with launch gaps removed; when ``fn`` cannot be captured,
      ``graph_error`` says why and ``kernel_s`` falls back to ``eager_s``
      (``kernel_method`` says which it is);
    - ``eager_s``: median of eager calls timed with CUDA events over ``rep_ms`` (launch
      gaps included);
    - ``host_launch_s``: host wall time per call (:func:`host_call_seconds`).

    Without CUDA all three are the same host-clock median. ``fn`` must have run once
    before (compiled, autotuned) and must not sync the host.
    """
    row: dict[str, Any] = {"eager_s": time_fn(fn, rep_ms=rep_ms)}
    if not torch.cuda.is_available():
        # On CPU the call is all host time: one figure serves for all three.
        row.update(host_launch_s=row["eager_s"], kernel_s=row["eager_s"],
                   kernel_method="host clock (no CUDA device: interpreter or torch on CPU)")
        return row
    row["host_launch_s"] = host_call_seconds(fn, calls=10, trials=3)
    from triton.testing import do_bench_cudagraph
    try:  # 10 replays of a graph holding ~graph_rep_ms of calls: ~10 x graph_rep_ms in all
        row["kernel_s"] = do_bench_cudagraph(fn, rep=graph_rep_ms,
                                             return_mode="median") * 1e-3
        row["kernel_method"] = "cuda graph replay (do_bench_cudagraph)"
    except Exception as exc:  # noqa: BLE001 - recorded, then the eager figure stands in
        torch.cuda.synchronize()
        row["graph_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        row["kernel_s"] = row["eager_s"]
        row["kernel_method"] = "eager, CUDA events (graph capture failed)"
    return row


def copy_bandwidth(nbytes: int = 1 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written,
    measured now on ``device`` with a plain ``Tensor.copy_`` of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def write_json_atomic(path: Path, doc: Any) -> Path:
    """Write ``doc`` (a mapping) as JSON with :func:`bench.report.write_json` (non-finite
    floats -> null) through :func:`bench.cli_checks.write_all_or_nothing` (a temporary file
    renamed into place), so readers (and a process killed mid-write) only ever see a whole
    document. Returns the path."""
    from bench.cli_checks import write_all_or_nothing
    from bench.report import write_json

    path = Path(path)
    write_all_or_nothing(path.parent, {path.name: lambda tmp: write_json(tmp, doc)})
    return path


class ResultFile:
    """One benchmark's JSON document, rewritten after every row.

    ``ResultFile("decode_attention", out_dir, workload={...})`` writes
    ``<results_dir(out_dir)>/decode_attention.json`` at once with the environment and the
    given top-level fields; :meth:`add` appends a row to a named section (a list) and
    rewrites the file; :meth:`set` sets a top-level field and rewrites it.
    """

    def __init__(self, name: str, out_dir: str | os.PathLike | None = None, **fields: Any):
        self.path = results_dir(out_dir) / f"{name}.json"
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.doc: dict[str, Any] = {"environment": environment(dev), **fields}
        self._flush()

    def _flush(self) -> None:
        write_json_atomic(self.path, self.doc)

    def set(self, key: str, value: Any) -> None:
        """Set top-level ``key`` and rewrite the file."""
        self.doc[key] = value
        self._flush()

    def add(self, section: str, row: dict[str, Any]) -> None:
        """Append ``row`` to list ``section`` and rewrite the file."""
        self.doc.setdefault(section, []).append(row)
        self._flush()


def error_row(exc: BaseException) -> dict[str, str]:
    """A failed measurement as a row field: the exception's type and a short message."""
    return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def write_result(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``payload`` plus :func:`environment` as ``<out_dir>/<name>.json``; returns the path."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"environment": environment(dev), **payload}
    return write_json_atomic(results_dir(out_dir) / f"{name}.json", doc)
