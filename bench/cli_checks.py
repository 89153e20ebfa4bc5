"""Checks the replay CLI makes before any compute, and the all-or-nothing result writer.

Everything here raises ``ValueError`` with a one-line message naming the option, which
:func:`bench.replay.main` turns into ``parser.error`` (exit status 2): a bad number or an
unusable output folder is reported in the first second, not after the whole replay.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

# Upper bounds: far beyond any real set-up, low enough that every size derived from them
# (bytes, block counts, table sizes) stays a small, exact integer.
MAX_DEVICE_MEMORY_GIB = 4096.0       # 4 TiB: over 10x the largest accelerator of 2026
MAX_BLOCK_SIZE = 1024                # tokens per KV block (engines use 8..256)
MAX_RUNNING = 1 << 16                # sequences running at once
MAX_TOKEN_BUDGET = 1 << 22           # tokens per model step
MAX_MODEL_LEN = 1 << 24              # tokens of one request, prompt plus output
MAX_TABLE_BYTES = 256 << 20          # int32 block table, max_running x blocks per request
DEFAULT_MAX_MODEL_LEN = 1 << 18      # 256 Ki tokens: longer than every shipped trace's rows


def check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """ValueError naming ``name`` unless ``value`` is a finite number in [lo, hi] (or
    (lo, hi] with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        left = "(" if lo_open else "["
        raise ValueError(f"{name} must be a finite number in {left}{lo:g}, {hi:g}], "
                         f"got {value!r}")


def check_count(name: str, value, hi: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int in [1, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        raise ValueError(f"{name} must be an integer in [1, {hi}], got {value!r}")


def check_replay_numbers(*, device_memory_gib: float | None, activation_reserve_gib: float,
                         memory_utilization: float, block_size: int, max_tokens: int,
                         token_budget: int, max_running: int, max_model_len: int,
                         arrival_reserve_s: float | None = None,
                         shrink_min_blocks: int | None = None) -> None:
    """Range-check the replay's numeric options (names as on the command line).

    Units: GiB for the two memory options, tokens for block size, max tokens, token budget
    and max model length, seconds for the arrival reserve. Also bounds the block table the
    replay allocates (``max_running x ceil(max_model_len / block_size)`` int32 entries) by
    :data:`MAX_TABLE_BYTES`. Raises ValueError naming the first bad option.
    """
    if device_memory_gib is not None:
        check_number("--device-memory-gib", device_memory_gib, 0, MAX_DEVICE_MEMORY_GIB,
                lo_open=True)
    check_number("--activation-reserve-gib", activation_reserve_gib, 0, MAX_DEVICE_MEMORY_GIB)
    check_number("--memory-utilization", memory_utilization, 0, 1, lo_open=True)
    check_count("--block-size", block_size, MAX_BLOCK_SIZE)
    check_count("--max-model-len", max_model_len, MAX_MODEL_LEN)
    check_count("--max-tokens", max_tokens, max_model_len)
    check_count("--token-budget", token_budget, MAX_TOKEN_BUDGET)
    check_count("--max-running", max_running, MAX_RUNNING)
    if arrival_reserve_s is not None:
        check_number("--arrival-reserve-s", arrival_reserve_s, 0, 24 * 3600)
    if shrink_min_blocks is not None and (isinstance(shrink_min_blocks, bool) or
                                          not isinstance(shrink_min_blocks, int) or
                                          shrink_min_blocks < 0):
        raise ValueError(f"--shrink-min-blocks must be an integer >= 0, got {shrink_min_blocks!r}")
    table = max_running * -(-max_model_len // block_size) * 4
    if table > MAX_TABLE_BYTES:
        raise ValueError(
            f"--max-running {max_running} x --max-model-len {max_model_len} / --block-size "
            f"{block_size} needs a {table / 2**20:.0f} MiB block table (at most "
            f"{MAX_TABLE_BYTES >> 20} MiB): lower one of them")


def check_step_truth_numbers(*, step_noise: float, step_bias: float, seed: int) -> None:
    """Range-check the simulated GPU's options (:class:`bench.step_truth.StepTruth`):
    ``--step-noise`` (log-space sigma) in [0, 1], ``--step-bias`` (a factor) in (0, 100],
    ``--seed`` an integer in [0, 2**63). Raises ValueError naming the first bad option."""
    check_number("--step-noise", step_noise, 0, 1)
    check_number("--step-bias", step_bias, 0, 100, lo_open=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {seed!r}")


def drop_over_max_model_len(trace, max_model_len: int, max_tokens: int):
    """``(trace without its over-long requests, how many were dropped, longest dropped)``.

    A request needs ``prompt_tokens + max_tokens`` positions (the bound an engine such as
    vLLM checks at admission), and the replay sizes every block-table row for the longest
    request kept, so one absurd row would otherwise cost memory for every sequence. Raises
    ValueError naming ``--max-model-len`` when no request is left.
    """
    from bench.traces import Trace

    need = trace.prompt_tokens + max_tokens
    keep = need <= max_model_len
    dropped = int((~keep).sum())
    if not dropped:
        return trace, 0, 0
    longest = int(need[~keep].max())
    if not keep.any():
        raise ValueError(f"--max-model-len {max_model_len}: every request of trace "
                         f"{trace.name!r} is longer (prompt_tokens + --max-tokens {max_tokens}; "
                         f"the longest needs {longest} tokens)")
    kept = Trace(trace.name, trace.source, trace.arrival_s[keep], trace.prompt_tokens[keep],
                 trace.output_tokens[keep])
    return kept, dropped, longest


def check_out_dir(out: str | os.PathLike) -> Path:
    """Make sure results can be written to folder ``out`` before anything is computed.

    Creates the folder (and its parents) when missing, then creates and removes a probe
    file in it. Raises ValueError naming ``--out`` when ``out`` is a file, sits under a
    file (``/dev/null/x``), or cannot be created or written. Returns the folder's path.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {str(path)!r} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--out {str(path)!r} is not a writable folder: "
                         f"{exc.strerror or exc}") from None
    return path


def write_all_or_nothing(folder: Path, writers: Mapping[str, Callable[[Path], object]]) -> list[Path]:
    """Write several result files so that either all of them land or none changes.

    ``writers`` maps each final file name (inside ``folder``) to a function that writes the
    file at the temporary path it is given. Every file is first written under a hidden
    temporary name in ``folder``; only when all writers succeeded are they renamed into
    place (a rename within one folder is atomic). On any failure the temporaries are removed,
    files from an earlier run stay untouched, and the error propagates. Returns the final
    paths in ``writers``' order.
    """
    folder = Path(folder)
    tag = f".tmp-{os.getpid()}-{np.random.default_rng().integers(1 << 30)}"
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in writers.items():
            final = folder / name
            tmp = folder / f".{name}{tag}{final.suffix}"   # keep the suffix: savefig reads it
            staged.append((tmp, final))
            write(tmp)
            if not tmp.is_file():
                raise OSError(f"writer for {name} wrote no file")
        for tmp, final in staged:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    return [final for _, final in staged]
