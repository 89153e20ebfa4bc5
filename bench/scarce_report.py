"""Tables and plots of the scarce-memory sweep (:mod:`bench.scarce_sweep`).

An *entry* is one (trace, budget): ``trace``, ``budget`` (``default`` or
``live_peak_x<f>``), ``fraction`` (None at the default), ``kv_budget_gib``,
``live_peak_gib`` (static's at the default budget; None when static did not run),
``policies`` (kv-replay summaries, one per policy) and ``scarce_targets`` (rows of
:func:`bench.report.check_scarce_targets`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

#: Columns of the combined table per policy: (summary key, header, format).
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


def budget_text(e: dict) -> str:
    """``default`` or ``1/4 peak live`` style label with the budget in GiB."""
    what = "default" if e["fraction"] is None else f"{e['fraction']:g} x peak live"
    return f"{what} ({e['kv_budget_gib']:.3g} GiB)"


def results_table(entries: Sequence[dict]) -> str:
    """One Markdown table: a row per trace x budget x policy, the issue's fields."""
    lines = ["| trace | budget | policy | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | rejected |", "|---|---|---|" + "---:|" * (len(COLUMNS) + 1)]
    for e in entries:
        for p in e["policies"]:
            cells = [_cell(p.get(k), f) for k, _, f in COLUMNS]
            lines.append(f"| {e['trace']} | {budget_text(e)} | {p['policy']} | "
                         + " | ".join(cells) + f" | {p.get('info', {}).get('rejected', 0)} |")
    return "\n".join(lines)


def targets_table(entries: Sequence[dict]) -> str:
    """Issue 9's targets per trace and budget (regime: scarce where static or on-demand
    preempted, else plentiful)."""
    lines = ["| trace | budget | regime | target | measured | met |",
             "|---|---|---|---|---|:---:|"]
    for e in entries:
        for r in e["scarce_targets"]:
            lines.append(f"| {e['trace']} | {budget_text(e)} | {r['regime']} | {r['policy']}: "
                         f"{r['target']} | {r['measured']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines) if len(lines) > 2 else "(no entry has static, on-demand and a " \
                                                   "windowed policy together)"


def failures_table(failures: Sequence[dict]) -> str:
    lines = ["| trace | budget | policy | error |", "|---|---|---|---|"]
    for f in failures:
        msg = " ".join(str(f["error"]).split()).replace("|", "\\|")[:300]
        lines.append(f"| {f['trace']} | {f['budget']} | {f['policy']} | {msg} |")
    return "\n".join(lines)


def markdown(entries: Sequence[dict], failures: Sequence[dict]) -> str:
    """The whole ``scarce.md``: results, targets and (when any) failed runs."""
    peaks = {e["trace"]: e["live_peak_gib"] for e in entries}
    parts = ["## Results\n", "Peak live KV at the default budget (static): " + "; ".join(
        f"{t} {p:.3g} GiB" if p is not None else f"{t} n/a" for t, p in peaks.items()) + ".\n",
        results_table(entries), "\n## Issue 9 targets\n", targets_table(entries)]
    if failures:
        parts += ["\n## Failed runs\n", failures_table(failures)]
    return "\n".join(parts) + "\n"


def plot(entries: Sequence[dict], path: Path, traces: Sequence[str] | None = None) -> None:
    """Preemptions (top) and TPOT p99 (bottom) against the KV budget, one line per policy,
    one column per trace (``traces``: which, default all in ``entries``); PNG at ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    traces = list(traces or dict.fromkeys(e["trace"] for e in entries))
    fig, axes = plt.subplots(2, len(traces), figsize=(4.8 * len(traces), 6.5), squeeze=False)
    for j, tr in enumerate(traces):
        es = sorted((e for e in entries if e["trace"] == tr), key=lambda e: e["kv_budget_gib"])
        pols = list(dict.fromkeys(p["policy"] for e in es for p in e["policies"]))
        for pol in pols:
            pts = [(e["kv_budget_gib"], p) for e in es for p in e["policies"]
                   if p["policy"] == pol]
            xs = [x for x, _ in pts]
            axes[0][j].plot(xs, [p["preemptions"] for _, p in pts], "o-", label=pol)
            axes[1][j].plot(xs, [float("nan") if p["tpot_p99_s"] is None else
                                 p["tpot_p99_s"] * 1e3 for _, p in pts], "o-", label=pol)
        axes[0][j].set_title(tr, fontsize=9)
        axes[0][j].set_ylabel("preemptions")
        axes[0][j].set_yscale("symlog", linthresh=1)
        axes[1][j].set_ylabel("TPOT p99 (ms)")
        budgets = sorted({e["kv_budget_gib"] for e in es})
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log")
            # ticks at the budgets replayed, plain numbers (log axes' minor labels overlap)
            ax.set_xticks(budgets, [f"{b:.3g}" for b in budgets])
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("KV budget (GiB)")
            ax.grid(True, alpha=0.3, which="both")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, entries: Sequence[dict], failures: Sequence[dict], *, command: str,
          plot_files: bool = True, runs: Sequence[dict] = ()) -> str:
    """Write ``scarce.json``, ``scarce.md`` and (``plot_files``) ``scarce.png`` plus
    ``scarce_<trace>.png`` per trace into ``out``, all or nothing. The JSON keeps each
    policy's summary without its raw counters (the per-run ``replay.json`` keeps them), and
    ``runs`` (each run's cost: wall and CPU seconds, peak RSS; not in the Markdown, which
    depends on the results only). Returns the Markdown text."""
    from bench import cli_checks, report

    text = markdown(entries, failures)
    small = [{**e, "policies": [{k: v for k, v in p.items() if k not in ("counters", "info")}
                                | {"rejected": p.get("info", {}).get("rejected", 0)}
                                for p in e["policies"]]} for e in entries]
    doc = {"command": command, "entries": small, "failures": list(failures), "runs": list(runs)}
    writers = {"scarce.json": lambda p: report.write_json(p, doc),
               "scarce.md": lambda p: p.write_text(text)}
    if plot_files and entries:
        traces = list(dict.fromkeys(e["trace"] for e in entries))
        writers["scarce.png"] = lambda p: plot(entries, p)
        for tr in traces:
            writers[f"scarce_{tr}.png"] = lambda p, tr=tr: plot(entries, p, [tr])
    cli_checks.write_all_or_nothing(out, writers)
    return text
