"""Print the Markdown tables of bench/results/REPLAY.md from the committed replay JSONs.

Run: ``python -m bench.summarize_replays [results/replay folder]``. Prints the targets matrix
(windowed:empirical against static on each full trace), issue 9's targets at each trace's
default budget, and each trace's full table with its plot, so the document is regenerated
from the numbers rather than typed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TRACES = ("azure_conv_2023", "mooncake_conv_first30min", "mooncake_synthetic")
DEFAULT = Path(__file__).resolve().parent / "results" / "replay"


def _load(path: Path) -> dict:
    return json.loads((path / "replay.json").read_text())


def targets_matrix(docs: dict[str, dict]) -> str:
    """One row per target, one column per trace: met / not met and the measured figure."""
    first = next(iter(docs.values()))
    lines = ["| target (windowed:empirical vs static) | " + " | ".join(docs) + " |",
             "|---|" + "---|" * len(docs)]
    for i, t in enumerate(first["targets"]):
        label = t["target"].replace("windowed:empirical: ", "")
        cells = [("met" if d["targets"][i]["met"] else "**not met**") + ": "
                 + d["targets"][i]["measured"] for d in docs.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def issue9_matrix(docs: dict[str, dict]) -> str:
    """Issue 9's targets at each trace's default budget (the plentiful regime unless static
    or on-demand preempted there); traces replayed before they were recorded are left out."""
    have = {n: d["scarce_targets"] for n, d in docs.items() if d.get("scarce_targets")}
    if not have:
        return "(no replay records issue 9's targets yet)"
    lines = ["| trace | regime | target | measured | met |", "|---|---|---|---|:---:|"]
    for name, rows in have.items():
        for r in rows:
            lines.append(f"| {name} | {r['regime']} | {r.get('policy', '')} {r['target']} | "
                         f"{r['measured']} | {'yes' if r['met'] else '**no**'} |")
    return "\n".join(lines)


def trace_sections(root: Path, docs: dict[str, dict]) -> str:
    """Per trace: size, replayed time, the plot and the full metrics table."""
    out = []
    for name, doc in docs.items():
        tr = doc["trace"]
        out.append(f"### {name}\n")
        out.append(f"{tr['requests']:,} requests over {tr['span_s']:.0f} s; replayed "
                   f"{doc['policies'][0]['replayed_s']:.0f} s of simulated time; "
                   f"{doc['wall_s']:.0f} s wall here for all {len(doc['policies'])} policies.\n")
        out.append(f"![{name}: mapped and live KV memory](replay/{name}/memory.png)\n")
        table = (root / name / "table.md").read_text()
        out.append(table.split("\n\n", 1)[1].split("\nTargets")[0].strip() + "\n")
    return "\n".join(out)


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or [DEFAULT])[0])
    docs = {t: _load(root / t) for t in TRACES if (root / t / "replay.json").exists()}
    if not docs:
        print(f"no replay results under {root}", file=sys.stderr)
        return 1
    print("## Targets\n\n" + targets_matrix(docs) + "\n")
    print("## Issue 9 targets at the default budget\n\n" + issue9_matrix(docs) + "\n")
    print("## Results per trace\n\n" + trace_sections(root, docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
