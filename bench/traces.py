"""Request traces for the replay: finding, loading and validating ``arrival_s,prompt_tokens,
output_tokens`` CSV files.

A trace is three numpy columns, one row per request, sorted by arrival:

- ``arrival_s``: float64 seconds from the first request in the file,
- ``prompt_tokens``: int64 prompt length in tokens (>= 1),
- ``output_tokens``: int64 generated length in tokens (>= 1).

Where traces come from (first match wins, see :func:`resolve_trace`): an explicit path; a name
of a file in :data:`EMBEDDED_DIR` (the slice shipped inside the package); a name of a file in
the shared trace folder (``$KV_REPLAY_TRACES`` or ``../shared/data/traces`` beside the
repository). The real traces' licences and attribution are in ``bench/data/README.md`` and in
the shared folder's README; they travel with every use of the data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The CSV header every trace file starts with, in this order.
TRACE_COLUMNS: tuple[str, str, str] = ("arrival_s", "prompt_tokens", "output_tokens")

#: The folder of traces shipped inside the package (package data).
EMBEDDED_DIR: Path = Path(__file__).resolve().parent / "data"

#: The trace a replay uses when none is named: the first minutes of the Azure 2023
#: conversation trace (CC BY 4.0, see bench/data/README.md).
EMBEDDED_TRACE: Path = EMBEDDED_DIR / "azure_conv_2023_slice.csv"


def shared_traces_dir() -> Path:
    """The folder holding the full real traces: ``$KV_REPLAY_TRACES`` when set, else
    ``../shared/data/traces`` relative to the repository root (it may not exist)."""
    env = os.environ.get("KV_REPLAY_TRACES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "traces"


@dataclass(frozen=True)
class Trace:
    """One request trace, validated: equal-length columns, sorted arrivals.

    Attributes: ``name`` (file stem or a label), ``source`` (where it was read from, or a
    description), ``arrival_s`` float64 [n] seconds, ``prompt_tokens`` int64 [n],
    ``output_tokens`` int64 [n].
    """

    name: str
    source: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        """Seconds from the first to the last arrival (0.0 for fewer than two requests)."""
        if len(self) < 2:
            return 0.0
        return float(self.arrival_s[-1] - self.arrival_s[0])

    def time_slice(self, start_s: float, end_s: float | None = None, *,
                   rebase: bool = True) -> "Trace":
        """Requests arriving in ``[start_s, end_s)`` seconds (``end_s=None``: to the end).

        With ``rebase`` (default) arrivals are shifted by ``-start_s`` so the slice starts
        at time 0, the way a replay that begins at ``start_s`` sees them. Raises ValueError
        naming ``start_s``/``end_s`` for a negative start, an empty or reversed range, or a
        range holding no request.
        """
        if not np.isfinite(start_s) or start_s < 0:
            raise ValueError(f"start_s must be a finite number >= 0, got {start_s!r}")
        if end_s is not None and (not np.isfinite(end_s) or end_s <= start_s):
            raise ValueError(f"end_s must be finite and > start_s={start_s}, got {end_s!r}")
        keep = self.arrival_s >= start_s
        if end_s is not None:
            keep &= self.arrival_s < end_s
        if not keep.any():
            raise ValueError(
                f"time slice [{start_s}, {end_s if end_s is not None else 'end'}) s of trace "
                f"{self.name!r} holds no request (its arrivals span "
                f"{self.arrival_s[0]:.3f}..{self.arrival_s[-1]:.3f} s)")
        shift = start_s if rebase else 0.0
        label = f"{self.name}[{start_s:g}:{'' if end_s is None else f'{end_s:g}'}]"
        return Trace(label, self.source, self.arrival_s[keep] - shift,
                     self.prompt_tokens[keep], self.output_tokens[keep])

    def head(self, n: int) -> "Trace":
        """The first ``n`` requests (all of them when the trace is shorter)."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if n >= len(self):
            return self
        return Trace(f"{self.name}[:{n}]", self.source, self.arrival_s[:n],
                     self.prompt_tokens[:n], self.output_tokens[:n])

    def describe(self) -> dict:
        """Row count, span and token-length statistics, as a JSON-ready dict."""
        def stats(x: np.ndarray) -> dict:
            return {"mean": float(x.mean()), "p50": float(np.percentile(x, 50)),
                    "p99": float(np.percentile(x, 99)), "max": int(x.max())}
        return {"name": self.name, "source": self.source, "requests": len(self),
                "span_s": self.duration_s,
                "rate_req_s": len(self) / self.duration_s if self.duration_s > 0 else None,
                "prompt_tokens": stats(self.prompt_tokens),
                "output_tokens": stats(self.output_tokens)}


def available_traces() -> dict[str, Path]:
    """Trace names (file stems) that :func:`resolve_trace` accepts, mapped to their paths."""
    found: dict[str, Path] = {}
    for folder in (shared_traces_dir(), EMBEDDED_DIR):   # embedded last: it wins on a clash
        if folder.is_dir():
            for p in sorted(folder.glob("*.csv")):
                found[p.stem] = p
    return found


def resolve_trace(spec: str | os.PathLike | None) -> Path:
    """The CSV path for ``spec``: None -> the embedded slice; an existing file -> itself;
    otherwise a trace name (with or without ``.csv``) from :func:`available_traces`.
    Raises ValueError naming ``trace`` and listing the known names when nothing matches."""
    if spec is None:
        return EMBEDDED_TRACE
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"trace must be a path or a name, got {type(spec).__name__}")
    path = Path(spec)
    if path.is_file():
        return path
    name = path.name[:-4] if path.name.endswith(".csv") else path.name
    known = available_traces()
    if str(spec) in (name, name + ".csv") and name in known:
        return known[name]
    raise ValueError(
        f"trace {str(spec)!r} is neither a file nor a known trace name; known names: "
        f"{', '.join(sorted(known)) or '(none found)'} (shared folder: {shared_traces_dir()})")


#: Longest field accepted (characters): every valid number fits in far fewer, and a bound
#: keeps numpy's fixed-width string columns (4 bytes x width x rows) small whatever the file.
MAX_FIELD_CHARS = 32
#: Largest token count accepted in a row: beyond any model's context, and small enough that
#: block counts derived from it never overflow int64 arithmetic.
MAX_TRACE_TOKENS = 10 ** 9
#: How much of an offending line or field an error message quotes.
EXCERPT_CHARS = 60


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``repr`` of ``text``, cut to about ``limit`` characters with the full length noted, so
    one huge field never makes a huge error line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _bad_row(path: Path, line_no: int, message: str) -> ValueError:
    return ValueError(f"{path}: line {line_no}: {message}")


def _parse_column(path: Path, values: list[str], line_nos: np.ndarray, column: str,
                  dtype: type) -> np.ndarray:
    """Convert one column of strings at once; on failure, find and name the first bad row.

    Fields are at most :data:`MAX_FIELD_CHARS` long (checked by the caller), so the
    temporary string array is small. Integers beyond int64 are reported like any other bad
    value (numpy raises OverflowError for them)."""
    try:
        return np.array(values, dtype=np.str_).astype(dtype)
    except (ValueError, OverflowError):
        for v, ln in zip(values, line_nos):
            try:
                np.array([v], dtype=np.str_).astype(dtype)
            except ValueError:
                kind = "a number" if dtype is np.float64 else "an integer"
                raise _bad_row(path, int(ln), f"{column}={excerpt(v)} is not {kind}") from None
            except OverflowError:
                raise _bad_row(path, int(ln), f"{column}={excerpt(v)} is out of range (at "
                                              f"most {MAX_TRACE_TOKENS})") from None
        raise  # pragma: no cover - the whole-column conversion failed, so some row must


def _read_text(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark is dropped. Raises ValueError naming the
    file when it cannot be read or is not UTF-8 text (a binary file, say)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"trace {str(path)!r} cannot be read: {exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"trace {str(path)!r} is not UTF-8 text (byte {exc.start}: "
                         f"{data[exc.start:exc.start + 8]!r}); expected a CSV with header "
                         f"{','.join(TRACE_COLUMNS)!r}") from None
    if "\x00" in text:
        raise ValueError(f"trace {str(path)!r} holds NUL bytes: a binary file, not a CSV "
                         f"with header {','.join(TRACE_COLUMNS)!r}")
    return text


def load_trace(spec: str | os.PathLike | None = None) -> Trace:
    """Load and validate a trace CSV (see :func:`resolve_trace` for ``spec``).

    Checks, each failing with a ValueError that names the file and the 1-based line:
    the file is UTF-8 text (a byte-order mark is allowed); the header is exactly
    ``arrival_s,prompt_tokens,output_tokens``; every row has three fields of at most
    :data:`MAX_FIELD_CHARS` characters; arrivals are finite numbers >= 0 in non-decreasing
    order; token counts are integers in ``[1, MAX_TRACE_TOKENS]``. Blank lines are skipped;
    an empty trace is an error. Error messages quote at most :data:`EXCERPT_CHARS`
    characters of the offending text.
    Returns a :class:`Trace` (float64 arrivals in seconds, int64 token counts).
    """
    path = resolve_trace(spec)
    lines = _read_text(path).splitlines()
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != TRACE_COLUMNS:
        got = excerpt(lines[0]) if lines else "(empty file)"
        raise _bad_row(path, 1, f"header must be {','.join(TRACE_COLUMNS)!r}, got {got}")
    rows, line_nos = [], []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 3:
            raise _bad_row(path, i, f"expected 3 comma-separated fields, got {len(fields)}: "
                                    f"{excerpt(line)}")
        fields = [f.strip() for f in fields]
        for column, f in zip(TRACE_COLUMNS, fields):
            if len(f) > MAX_FIELD_CHARS:
                raise _bad_row(path, i, f"{column}={excerpt(f)} is longer than "
                                        f"{MAX_FIELD_CHARS} characters")
        rows.append(fields)
        line_nos.append(i)
    if not rows:
        raise ValueError(f"{path}: the trace holds no request (only a header)")
    ln = np.asarray(line_nos)
    cols = list(zip(*rows))
    arrival = _parse_column(path, list(cols[0]), ln, "arrival_s", np.float64)
    prompt = _parse_column(path, list(cols[1]), ln, "prompt_tokens", np.int64)
    output = _parse_column(path, list(cols[2]), ln, "output_tokens", np.int64)

    bad = ~np.isfinite(arrival) | (arrival < 0)
    if bad.any():
        k = int(np.argmax(bad))
        raise _bad_row(path, int(ln[k]), f"arrival_s={cols[0][k]!r} must be a finite number >= 0")
    for name, col, raw in (("prompt_tokens", prompt, cols[1]), ("output_tokens", output, cols[2])):
        bad = col < 1
        if bad.any():
            k = int(np.argmax(bad))
            raise _bad_row(path, int(ln[k]), f"{name}={raw[k]!r} must be >= 1")
        bad = col > MAX_TRACE_TOKENS
        if bad.any():
            k = int(np.argmax(bad))
            raise _bad_row(path, int(ln[k]), f"{name}={raw[k]!r} is above the "
                                             f"{MAX_TRACE_TOKENS} tokens a trace row may hold")
    back = np.diff(arrival) < 0
    if back.any():
        k = int(np.argmax(back)) + 1
        raise _bad_row(path, int(ln[k]),
                       f"arrival_s={cols[0][k]!r} is earlier than the row before "
                       f"({cols[0][k - 1]}): rows must be sorted by arrival")
    return Trace(path.stem, str(path), arrival, prompt, output)


def write_trace(trace: Trace, path: str | os.PathLike) -> Path:
    """Write ``trace`` as a CSV in the same format (arrivals with 6 decimals); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.write(",".join(TRACE_COLUMNS) + "\n")
        for a, p, o in zip(trace.arrival_s, trace.prompt_tokens, trace.output_tokens):
            fh.write(f"{a:.6f},{int(p)},{int(o)}\n")
    return path
