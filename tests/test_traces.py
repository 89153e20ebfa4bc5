"""Trace loader on hostile files: huge fields, out-of-range numbers, BOM headers, binary
files. Every failure is one short ValueError naming the file and line."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from bench import traces

HEADER = "arrival_s,prompt_tokens,output_tokens\n"


def _write(tmp_path, data, name="t.csv"):
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data)
    return p


def _error(path) -> str:
    with pytest.raises(ValueError) as exc:
        traces.load_trace(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg or path.name in msg
    return msg


def test_bom_header_is_accepted(tmp_path):
    p = _write(tmp_path, b"\xef\xbb\xbf" + (HEADER + "0,10,5\n1.5,3,2\n").encode())
    t = traces.load_trace(p)
    np.testing.assert_array_equal(t.prompt_tokens, [10, 3])
    np.testing.assert_allclose(t.arrival_s, [0.0, 1.5])


@pytest.mark.parametrize("data", [
    bytes(range(256)) * 4,                                  # not UTF-8
    (HEADER + "0,1,1\n").encode() + b"\x00\x00\x00\x00",   # UTF-8 but NUL bytes
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
])
def test_binary_file_error_names_the_file(tmp_path, data):
    msg = _error(_write(tmp_path, data, "blob.csv"))
    assert "blob.csv" in msg
    assert len(msg) < 400


def test_huge_field_is_rejected_quickly_with_a_short_message(tmp_path):
    p = _write(tmp_path, HEADER + "0,1,1\n1," + "9" * 10_000_000 + ",2\n")
    tracemalloc.start()
    try:
        msg = _error(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "line 3" in msg and "prompt_tokens" in msg and "10000000 characters" in msg
    assert len(msg) < 400
    # The file text and its lines (~3 x 10 MB) at most; numpy's string column would be GBs.
    assert peak < 200 << 20


def test_long_line_with_wrong_field_count_is_excerpted(tmp_path):
    msg = _error(_write(tmp_path, HEADER + "0,1,1\n" + "x" * 5_000_000 + "\n"))
    assert "line 3" in msg and "3 comma-separated" in msg and len(msg) < 400


def test_long_header_is_excerpted(tmp_path):
    msg = _error(_write(tmp_path, "a" * 1_000_000 + "\n0,1,1\n"))
    assert "header" in msg and len(msg) < 400


@pytest.mark.parametrize("value, words", [
    (str(2 ** 63), "out of range"),
    ("9" * 30, "out of range"),
    ("1e18", "not an integer"),
    (str(10 ** 18), "above the"),
    (str(traces.MAX_TRACE_TOKENS + 1), "above the"),
])
def test_token_counts_beyond_bounds(tmp_path, value, words):
    msg = _error(_write(tmp_path, HEADER + f"0,1,1\n1,{value},2\n"))
    assert "line 3" in msg and "prompt_tokens" in msg and words in msg


def test_output_tokens_bound_and_largest_accepted(tmp_path):
    msg = _error(_write(tmp_path, HEADER + f"0,1,{2 ** 63}\n"))
    assert "output_tokens" in msg and "line 2" in msg
    t = traces.load_trace(_write(tmp_path, HEADER + f"0,{traces.MAX_TRACE_TOKENS},1\n", "ok.csv"))
    assert int(t.prompt_tokens[0]) == traces.MAX_TRACE_TOKENS


def test_huge_arrival_is_not_finite(tmp_path):
    msg = _error(_write(tmp_path, HEADER + "1e999,1,1\n"))
    assert "finite number" in msg


def test_excerpt_bounds_length():
    assert traces.excerpt("abc") == "'abc'"
    long = traces.excerpt("z" * 1000)
    assert len(long) < traces.EXCERPT_CHARS + 40 and "1000 characters" in long
