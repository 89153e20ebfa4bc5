"""The scarce-memory comparison (issue 9): each trace replayed at its default KV budget and at
fractions of its peak live KV, where static and on-demand must preempt.

    python -m bench.scarce_sweep --trace bench/data/azure_conv_2023_slice.csv \\
        --out bench/results/scarce [--fraction 0.25 --fraction 0.125] [-- replay options]

For each trace: ``kv-replay`` at the default budget, then at each fraction of the peak live
KV static reached there (``--kv-budget-gib``). Each replay's folder keeps its own
``replay.json``/``table.md``; ``scarce.json`` and ``scarce.md`` gather per trace, budget and
policy: preemptions, recomputed and swapped tokens, TTFT and TPOT p50/p99, throughput,
mapped GiB, critical-path and total arena time, rejected requests, and issue 9's targets;
``scarce.png`` plots preemptions and TPOT p99 against the budget for each policy.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from bench import replay

#: What scarce.md shows per policy (summary key, column header, format).
COLUMNS = (("preemptions", "preempt.", "{:,.0f}"), ("recomputed_tokens", "recomp. tok", "{:,.0f}"),
           ("swapped_tokens", "swapped tok", "{:,.0f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
           ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("tpot_p50_s", "TPOT p50 ms", "ms"),
           ("tpot_p99_s", "TPOT p99 ms", "ms"), ("throughput_tok_s", "tok/s", "{:,.1f}"),
           ("mapped_avg_gib", "mapped GiB", "{:.3f}"),
           ("arena_time_frac", "arena crit. %", "pct"),
           ("arena_total_time_frac", "arena total %", "pct"))


def _cell(v, fmt: str) -> str:
    if v is None:
        return "n/a"
    if fmt == "ms":
        return f"{v * 1e3:.2f}"
    if fmt == "pct":
        return f"{v * 100:.3f}"
    return fmt.format(v)


def sweep(trace: str, out: Path, fractions: Sequence[float], extra: Sequence[str]) -> list[dict]:
    """Replay ``trace`` at the default budget and at each fraction of static's peak live KV
    there; returns one entry per budget: ``label``, ``kv_budget_gib``, the replay doc's
    ``policies``, ``scarce_targets`` and ``command``."""
    name = Path(trace).stem
    runs = []
    base = ["--trace", trace, "--quiet", "--no-plot", *extra]
    folder = out / name / "default"
    if replay.main([*base, "--out", str(folder)]) != 0:
        raise RuntimeError(f"replay of {trace} failed")
    doc = json.loads((folder / "replay.json").read_text())
    runs.append(("default", doc))
    static = next((p for p in doc["policies"] if p["policy"] == "static"), None)
    if static is None:
        raise ValueError("the sweep needs the static policy (its peak live KV sets the budgets)")
    peak = static["live_peak_gib"]
    for f in fractions:
        folder = out / name / f"live_peak_x{f:g}"
        if replay.main([*base, "--kv-budget-gib", f"{peak * f:.6f}", "--out", str(folder)]) != 0:
            raise RuntimeError(f"replay of {trace} at {f:g} x peak live failed")
        runs.append((f"{f:g} x peak live", json.loads((folder / "replay.json").read_text())))
    return [{"trace": name, "label": label, "kv_budget_gib": d["setup"]["kv_budget_gib"],
             "live_peak_gib": peak, "command": d["command"], "policies": d["policies"],
             "scarce_targets": d.get("scarce_targets", [])} for label, d in runs]


def markdown(entries: Sequence[dict]) -> str:
    """One table per trace and budget, and issue 9's targets under it."""
    out = []
    for e in entries:
        out.append(f"### {e['trace']}: {e['label']} ({e['kv_budget_gib']:.3g} GiB; peak live "
                   f"KV {e['live_peak_gib']:.3g} GiB)\n")
        out.append("| policy | " + " | ".join(h for _, h, _ in COLUMNS) + " | rejected |")
        out.append("|---|" + "---:|" * (len(COLUMNS) + 1))
        for p in e["policies"]:
            cells = [_cell(p.get(k), f) for k, _, f in COLUMNS]
            out.append(f"| {p['policy']} | " + " | ".join(cells)
                       + f" | {p['info'].get('rejected', 0)} |")
        t = e["scarce_targets"]
        if t:
            out.append(f"\nIssue 9 targets ({t[0]['regime']}, {t[0]['policy']}): " + "; ".join(
                f"{r['target']}: {r['measured']} ({'met' if r['met'] else '**not met**'})"
                for r in t))
        out.append("")
    return "\n".join(out)


def plot(entries: Sequence[dict], path: Path) -> None:
    """Preemptions and TPOT p99 against the KV budget, one line per policy, per trace."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(e["trace"] for e in entries))
    fig, axes = plt.subplots(2, len(traces), figsize=(4.5 * len(traces), 6.5), squeeze=False)
    for j, tr in enumerate(traces):
        es = sorted((e for e in entries if e["trace"] == tr), key=lambda e: e["kv_budget_gib"])
        pols = [p["policy"] for p in es[0]["policies"]]
        for pol in pols:
            xs = [e["kv_budget_gib"] for e in es]
            ps = [next(p for p in e["policies"] if p["policy"] == pol) for e in es]
            axes[0][j].plot(xs, [p["preemptions"] for p in ps], "o-", label=pol)
            axes[1][j].plot(xs, [(p["tpot_p99_s"] or 0) * 1e3 for p in ps], "o-", label=pol)
        axes[0][j].set_title(tr, fontsize=9)
        axes[0][j].set_ylabel("preemptions")
        axes[1][j].set_ylabel("TPOT p99 (ms)")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log")
            ax.set_xlabel("KV budget (GiB)")
            ax.grid(True, alpha=0.3, which="both")
        axes[0][j].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m bench.scarce_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", action="append", required=True, help="trace path or name")
    ap.add_argument("--fraction", type=float, action="append", default=None,
                    help="budget as a fraction of static's peak live KV (default 0.25, 0.125)")
    ap.add_argument("--out", default="out/scarce")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    fractions = args.fraction or [0.25, 0.125]
    if any(not 0 < f <= 1 for f in fractions):
        ap.error(f"--fraction must be in (0, 1], got {fractions}")
    out = Path(args.out)
    entries = [e for t in args.trace for e in sweep(t, out, fractions, extra)]
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python -m bench.scarce_sweep " + " ".join(
        sys.argv[1:] if argv is None else [*argv, *(["--", *extra] if extra else [])]),
        "entries": [{k: v for k, v in e.items()} for e in entries]}
    for e in doc["entries"]:   # the per-replay JSONs keep everything; keep this one small
        e["policies"] = [{k: v for k, v in p.items() if k not in ("counters", "info")}
                         | {"rejected": p["info"].get("rejected", 0)} for p in e["policies"]]
    (out / "scarce.json").write_text(json.dumps(doc, indent=1))
    text = markdown(entries)
    (out / "scarce.md").write_text(text)
    if not args.no_plot:
        plot(entries, out / "scarce.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
