"""The replay CLI fails early and never half-writes: absurd numbers and unusable output
folders are one-line errors with exit status 2 before any compute; over-long trace rows are
dropped and reported; results land all together or not at all."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import cli_checks, replay, traces

ROOT = Path(__file__).resolve().parents[1]
HEADER = "arrival_s,prompt_tokens,output_tokens\n"
TINY = ["--model", "tiny", "--device-memory-gib", "0.25", "--activation-reserve-gib", "0.05",
        "--max-tokens", "64", "--arrival-reserve-s", "0", "--quiet", "--policy", "static",
        "--policy", "on-demand"]


def _trace(tmp_path, rows=None, name="t.csv"):
    if rows is None:
        rng = np.random.default_rng(1)
        rows = [(float(a), int(p), int(o)) for a, p, o in
                zip(np.sort(rng.uniform(0, 1, 12)), rng.integers(10, 200, 12),
                    rng.integers(2, 40, 12))]
    p = tmp_path / name
    p.write_text(HEADER + "".join(f"{a},{q},{o}\n" for a, q, o in rows))
    return p


def _fails(argv, capsys, words):
    """main(argv) exits 2 with ``words`` in a one-line error, before any replay runs."""
    with pytest.raises(SystemExit) as exc:
        replay.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("kv-replay: error")]
    assert len(lines) == 1, err
    assert words in lines[0], err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_replay(monkeypatch):
    """Any attempt to run a policy fails the test: errors must come before compute."""
    def boom(*a, **k):
        raise AssertionError("the replay ran before the arguments were checked")
    monkeypatch.setattr(replay, "run_policy", boom)


@pytest.mark.parametrize("extra, words", [
    (["--device-memory-gib", "inf"], "--device-memory-gib"),
    (["--device-memory-gib", "nan"], "--device-memory-gib"),
    (["--device-memory-gib", "1e12"], "--device-memory-gib"),
    (["--device-memory-gib", "-3"], "--device-memory-gib"),
    (["--activation-reserve-gib", "inf"], "--activation-reserve-gib"),
    (["--activation-reserve-gib", "1e300"], "--activation-reserve-gib"),
    (["--memory-utilization", "nan"], "--memory-utilization"),
    (["--block-size", "1000000000"], "--block-size"),
    (["--block-size", "1e9"], "--block-size"),
    (["--block-size", "0"], "--block-size"),
    (["--max-tokens", "1000000000000"], "--max-tokens"),
    (["--max-tokens", "1e12"], "--max-tokens"),
    (["--max-running", "1000000000"], "--max-running"),
    (["--max-running", "1e9"], "--max-running"),
    (["--token-budget", "0"], "--token-budget"),
    (["--max-model-len", "0"], "--max-model-len"),
    (["--max-model-len", str(1 << 40)], "--max-model-len"),
    (["--max-running", "60000", "--max-model-len", "1000000"], "block table"),
    (["--arrival-reserve-s", "inf"], "--arrival-reserve-s"),
    (["--shrink-min-blocks", "-1"], "--shrink-min-blocks"),
    (["--step-noise", "-0.1"], "--step-noise"),
    (["--step-noise", "nan"], "--step-noise"),
    (["--step-noise", "3"], "--step-noise"),
    (["--step-bias", "0"], "--step-bias"),
    (["--step-bias", "inf"], "--step-bias"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(1 << 64)], "--seed"),
    (["--max-decode-steps", "0"], "max_decode_steps"),
    (["--margin-fraction", "-1"], "margin_fraction"),
    (["--prefetch-quantile", "1.5"], "--prefetch-quantile"),
    (["--prefetch-quantile", "nan"], "--prefetch-quantile"),
])
def test_absurd_numbers_are_one_line_errors(tmp_path, capsys, no_replay, extra, words):
    _fails(["--trace", str(_trace(tmp_path)), "--out", str(tmp_path / "o"), "--quiet", *extra],
           capsys, words)


def test_trace_row_with_1e18_prompt_tokens(tmp_path, capsys, no_replay):
    for value in ("1e18", str(10 ** 18), str(2 ** 63)):
        path = _trace(tmp_path, [(0.0, 10, 2), (0.5, value, 3)])
        line = _fails(["--trace", str(path), "--out", str(tmp_path / "o"), "--quiet"], capsys,
                      "prompt_tokens")
        assert "line 3" in line and len(line) < 400


def test_huge_field_in_trace_gives_a_short_error(tmp_path, capsys, no_replay):
    path = _trace(tmp_path, [(0.0, 10, 2), (0.5, "7" * 2_000_000, 3)])
    line = _fails(["--trace", str(path), "--out", str(tmp_path / "o"), "--quiet"], capsys,
                  "characters")
    assert len(line) < 400


@pytest.mark.parametrize("make_out, words", [
    (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "not a folder"),
    (lambda tmp: Path("/dev/null/x"), "--out"),
    (lambda tmp: (tmp / "f2").write_text("x") and tmp / "f2" / "sub", "--out"),
])
def test_bad_out_is_rejected_before_the_replay(tmp_path, capsys, no_replay, make_out, words):
    out = make_out(tmp_path)
    _fails(["--trace", str(_trace(tmp_path)), "--out", str(out), "--quiet"], capsys, words)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_folder(tmp_path, capsys, no_replay):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails(["--trace", str(_trace(tmp_path)), "--out", str(ro), "--quiet"], capsys,
               "not a writable folder")
    finally:
        ro.chmod(0o700)


def test_out_probe_failure_is_reported(tmp_path, monkeypatch):
    """The write probe's OSError (what an unwritable folder gives) becomes the --out error."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cli_checks.tempfile, "mkstemp", denied)
    with pytest.raises(ValueError, match="--out .* not a writable folder: Permission denied"):
        cli_checks.check_out_dir(tmp_path / "x")


def test_over_long_rows_are_dropped_and_reported(tmp_path, capsys):
    rows = [(0.0, 30, 5), (0.1, 20_000_000, 4), (0.2, 40, 6), (0.3, 200, 3)]
    out = tmp_path / "out"
    assert replay.main(["--trace", str(_trace(tmp_path, rows)), "--out", str(out), "--no-plot",
                        "--max-model-len", "1000", *TINY]) == 0
    err = capsys.readouterr().err
    assert "dropped 1 requests longer than --max-model-len 1000" in err
    assert "20000064 tokens" in err
    doc = json.loads((out / "replay.json").read_text())
    assert doc["trace"]["requests"] == 3
    assert doc["trace"]["dropped_over_max_model_len"] == 1
    assert doc["trace"]["max_model_len"] == 1000
    for p in doc["policies"]:
        assert p["requests_finished"] == 3


def test_every_row_over_max_model_len_is_an_error(tmp_path, capsys, no_replay):
    _fails(["--trace", str(_trace(tmp_path, [(0.0, 5000, 2)])), "--out", str(tmp_path / "o"),
            "--max-model-len", "1000", "--max-tokens", "64", "--quiet"], capsys,
           "--max-model-len 1000")


def test_long_prompt_does_not_size_the_table(tmp_path):
    """2e7 prompt tokens used to set every table row's width (1.7 GB peak); now the row is
    dropped and the table stays sized by --max-model-len."""
    trace = traces.Trace("t", "t", np.array([0.0, 1.0]), np.array([100, 20_000_000]),
                         np.array([2, 2]))
    kept, dropped, longest = cli_checks.drop_over_max_model_len(trace, 4096, 64)
    assert (len(kept), dropped, longest) == (1, 1, 20_000_064)
    assert int(kept.prompt_tokens.max()) + 64 <= 4096
    same, none, _ = cli_checks.drop_over_max_model_len(trace, 1 << 25, 64)
    assert same is trace and none == 0


def test_failed_png_leaves_no_half_written_set(tmp_path, monkeypatch, capsys):
    from bench import report

    out = tmp_path / "out"
    out.mkdir()
    (out / "replay.json").write_text("old")

    def broken_plot(runs, path, **kw):
        Path(path).write_bytes(b"\x89PNG half")   # starts writing, then fails
        raise RuntimeError("no PNG today")
    monkeypatch.setattr(report, "plot_memory", broken_plot)
    with pytest.raises(RuntimeError, match="no PNG today"):
        replay.main(["--trace", str(_trace(tmp_path)), "--out", str(out), *TINY])
    assert sorted(p.name for p in out.iterdir()) == ["replay.json"]
    assert (out / "replay.json").read_text() == "old"


def test_write_all_or_nothing_lands_everything(tmp_path):
    paths = cli_checks.write_all_or_nothing(tmp_path, {
        "a.json": lambda p: p.write_text("{}"), "b.md": lambda p: p.write_text("# b")})
    assert [p.name for p in paths] == ["a.json", "b.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md"]
    with pytest.raises(OSError, match="wrote no file"):
        cli_checks.write_all_or_nothing(tmp_path, {"c.txt": lambda p: None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md"]


def test_cli_subprocess_exit_status_and_single_line(tmp_path):
    """Through the real entry point: exit status 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench.replay", "--trace", str(_trace(tmp_path)),
                           "--out", "/dev/null/x", "--device-memory-gib", "inf", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--device-memory-gib" in proc.stderr.splitlines()[-1]


def test_bad_trace_creates_no_out_folder(tmp_path, capsys, no_replay):
    bad = tmp_path / "blob.csv"
    bad.write_bytes(bytes(range(256)))
    out = tmp_path / "never"
    _fails(["--trace", str(bad), "--out", str(out), "--quiet"], capsys, "blob.csv")
    assert not out.exists()
