"""The scarce-memory comparison (issue 9): each trace replayed at its default KV budget and at
fractions of its peak live KV, where static and on-demand must preempt.

    python -m bench.scarce_sweep --trace azure_conv_2023 --trace mooncake_synthetic \\
        --out bench/results/scarce/full --jobs 2 [--fraction 0.25 --fraction 0.125] \\
        [--with-max-tokens] [--force] [-- kv-replay options]

``--trace`` takes a CSV path or a shared trace name, as ``kv-replay`` does. Every
(trace, budget, policy) is one run: ``kv-replay --policy P`` in its own folder
``<out>/<trace>/<budget>/<policy>/`` (``replay.json``, ``table.md``) plus the sweep's
``run.json`` (its configuration, the configuration's hash, wall time and the policy's
summary). The budgets: the default, then each fraction of the peak live KV that static
reached at the default budget (``--kv-budget-gib``), so a trace's scarce runs start once its
static default run is done.

Runs go to ``--jobs`` worker processes, a fresh one per run (its memory returned after it,
its peak RSS recorded), and no more at once than ``--memory-gib`` is expected to hold (a
preempting run keeps up to about its KV budget of swapped and copied KV in host memory);
results are gathered in (trace, budget, policy) order whatever order they finish in. A run whose ``run.json`` records the same
configuration hash is skipped (the hash covers the replay's arguments, the trace file's
bytes and the source of the code a replay runs), so an interrupted sweep resumes and a code
change reruns everything; ``--force`` reruns regardless. A failed run is reported with its
trace, budget and policy; the others are still written, and the exit status is 1.

Outputs in ``--out`` (written all or nothing): ``scarce.json`` and ``scarce.md`` (one table
over every trace, budget and policy, issue 9's targets, failures), ``scarce.png`` (all traces)
and ``scarce_<trace>.png`` (preemptions and TPOT p99 against the budget, per policy).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import hashlib
import io
import json
import multiprocessing
import resource
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bench import cli_checks

#: The shared full traces (names ``kv-replay --trace`` resolves in the shared folder).
SHARED_TRACES = ("azure_conv_2023", "mooncake_conv_first30min", "mooncake_synthetic")
#: Policies swept by default; ``--with-max-tokens`` adds ``windowed:max_tokens``.
DEFAULT_POLICIES = ("static", "on-demand", "windowed:empirical", "windowed:oracle")
DEFAULT_FRACTIONS = (0.25, 0.125)
#: kv-replay options the sweep sets itself for every run.
OWN_OPTIONS = ("--trace", "--policy", "--predictor", "--kv-budget-gib", "--out", "--no-plot",
               "--quiet")
#: The repository's code a replay can run: a change to any of it invalidates a stored run.
#: The sweep's own aggregation modules are left out (they do not change a run's numbers).
CODE_PACKAGES = ("arena", "kernels", "scheduler", "engine", "bench")
NOT_RUN_CODE = ("bench/scarce_sweep.py", "bench/scarce_report.py", "bench/summarize_replays.py")
REPO = Path(__file__).resolve().parent.parent


def code_fingerprint(root: Path = REPO) -> str:
    """sha256 (hex) over the path and bytes of every ``*.py`` file in :data:`CODE_PACKAGES`
    under ``root``, except :data:`NOT_RUN_CODE`."""
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in NOT_RUN_CODE:
                continue
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def budget_label(fraction: float | None) -> str:
    """Folder name of a budget: ``default`` or ``live_peak_x<fraction>``."""
    return "default" if fraction is None else f"live_peak_x{fraction:g}"


@dataclass(frozen=True)
class RunSpec:
    """One (trace, budget, policy) replay. ``kv_budget_gib`` None: the replay's default
    budget; ``fraction``: which share of static's peak live KV the budget is (None at the
    default); ``trace_sha256``/``code``: fingerprints that make up the configuration."""

    trace: str                      # trace name (file stem)
    trace_path: str
    trace_sha256: str
    fraction: float | None
    kv_budget_gib: float | None
    policy: str
    extra: tuple[str, ...]
    code: str
    out: str                        # the sweep's --out folder

    @property
    def budget(self) -> str:
        return budget_label(self.fraction)

    @property
    def folder(self) -> Path:
        return Path(self.out) / self.trace / self.budget / self.policy.replace(":", "_")

    @property
    def name(self) -> str:
        return f"{self.trace} / {self.budget} / {self.policy}"

    def replay_argv(self) -> list[str]:
        """The ``kv-replay`` arguments of this run."""
        argv = ["--trace", self.trace_path, "--policy", self.policy]
        if self.kv_budget_gib is not None:
            argv += ["--kv-budget-gib", f"{self.kv_budget_gib:.9g}"]
        return argv + ["--quiet", "--no-plot", *self.extra, "--out", str(self.folder)]

    def config(self) -> dict:
        """What determines the run's numbers (not where it is written)."""
        argv = self.replay_argv()[:-2]          # without --out
        argv[1] = Path(self.trace_path).name    # the bytes are hashed; the folder is moot
        return {"replay_argv": argv, "trace_sha256": self.trace_sha256, "code": self.code}


def config_hash(config: dict, *, with_code: bool = True) -> str:
    """sha256 (hex) of a run's configuration as canonical JSON (without the code
    fingerprint when ``with_code`` is False)."""
    c = dict(config) if with_code else {k: v for k, v in config.items() if k != "code"}
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()


def stored_run(spec: RunSpec, *, ignore_code: bool = False) -> dict | None:
    """The stored ``run.json`` of ``spec`` when it records the same configuration (and its
    ``replay.json`` is there), else None. ``ignore_code``: accept a run made by other code."""
    path = spec.folder / "run.json"
    if not path.is_file() or not (spec.folder / "replay.json").is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        if ignore_code:
            same = config_hash(rec["config"], with_code=False) == config_hash(
                spec.config(), with_code=False)
        else:
            same = rec["config_hash"] == config_hash(spec.config())
    except (ValueError, KeyError, TypeError):
        return None                              # unreadable: run it again
    return rec if same else None


def run_one(spec: RunSpec, single_thread: bool = False) -> dict:
    """Replay ``spec`` (``kv-replay`` in this process, its output captured) and write its
    ``run.json``; returns that record. Raises RuntimeError with the replay's error (its
    exception, or its error output and exit status) when the replay fails. ``single_thread``: one torch thread (workers
    sharing few cores)."""
    from bench import replay, report

    if single_thread:
        import torch
        torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = replay.main(spec.replay_argv())
    except SystemExit as exc:                    # bad arguments: parser.error
        status = exc.code
    except Exception as exc:
        tail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        raise RuntimeError(tail) from exc
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    if status != 0:
        lines = err.getvalue().strip().splitlines() or ["(no error output)"]
        raise RuntimeError(f"kv-replay exited with status {status}: {lines[-1][-2000:]}")
    doc = json.loads((spec.folder / "replay.json").read_text())
    config = spec.config()
    rec = {"trace": spec.trace, "budget": spec.budget, "fraction": spec.fraction,
           "policy": spec.policy, "kv_budget_gib": doc["setup"]["kv_budget_gib"],
           "config": config, "config_hash": config_hash(config), "wall_s": wall, "cpu_s": cpu,
           # the process's peak: this run's own when it had a fresh process
           "process_max_rss_gib": rss,
           "trace_info": doc["trace"], "summary": doc["policies"][0]}
    cli_checks.write_all_or_nothing(spec.folder,
                                    {"run.json": lambda p: report.write_json(p, rec)})
    return rec


class InlineExecutor(cf.Executor):
    """Runs each submitted call at once in this process (``--jobs 1``)."""

    def submit(self, fn, /, *args, **kwargs):
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


@dataclass
class SweepResult:
    """Records of every run that has one, keyed by (trace, budget, policy); failures as
    ``{"trace", "budget", "policy", "error"}``; ``ran``/``skipped``: run names."""

    records: dict
    failures: list
    ran: list
    skipped: list


def memory_estimate_gib(spec: RunSpec) -> float:
    """Host memory a run is expected to peak at (GiB), for :func:`execute`'s memory limit.
    A preempting run keeps its host swap copies and the arena pages that swap-ins wrote
    resident: measured on mooncake_synthetic at a 6.1 GiB budget (1/8 of peak live), 9.9 GiB
    peak RSS under static and 7.8 GiB under on-demand; at the default budget 0.4 GiB."""
    return 1.0 if spec.kv_budget_gib is None else 1.0 + 1.7 * spec.kv_budget_gib


def available_memory_gib() -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def pick_next(ready: Sequence[RunSpec], running: Sequence[RunSpec],
              memory_gib: float | None) -> int | None:
    """Index of the first run in ``ready`` whose :func:`memory_estimate_gib` fits beside the
    ``running`` ones within ``memory_gib`` (None: no limit); with nothing running, the first
    run whatever it needs (it then runs alone). None when nothing fits now."""
    if not ready:
        return None
    if memory_gib is None or not running:
        return 0
    held = sum(memory_estimate_gib(r) for r in running)
    return next((i for i, r in enumerate(ready) if held + memory_estimate_gib(r) <= memory_gib),
                None)


def execute(traces: Sequence[tuple[str, Path]], out: Path, policies: Sequence[str],
            fractions: Sequence[float], extra: Sequence[str], *, jobs: int = 1,
            force: bool = False, ignore_code: bool = False, memory_gib: float | None = None,
            inline: bool = False, runner: Callable[..., dict] = run_one,
            log=print) -> SweepResult:
    """Run every (trace, budget, policy) not already stored; ``traces``: (name, CSV path)
    pairs. Each trace's static default run is scheduled first: its peak live KV sets the
    scarce budgets. Each run gets a fresh worker process (so its memory is returned and its
    peak RSS is its own), at most ``jobs`` at once and, where ``memory_gib`` is given, at
    most that much :func:`memory_estimate_gib` at once (a run that needs more runs alone).
    ``inline``: run in this process instead (tests). ``runner(spec, single_thread)`` does one
    run (module-level, so workers can load it). Returns what was run, skipped, stored and
    failed."""
    code = code_fingerprint()
    shas = {name: file_sha256(path) for name, path in traces}
    order = {name: i for i, (name, _) in enumerate(traces)}

    def spec(name, path, fraction, budget_gib, policy):
        return RunSpec(name, str(path), shas[name], fraction, budget_gib, policy, tuple(extra),
                       code, str(out))

    res = SweepResult({}, [], [], [])
    ready: list[RunSpec] = []
    running: dict[cf.Future, RunSpec] = {}

    def enqueue(specs) -> None:
        """Queue runs; a stored one (same configuration) counts as finished at once."""
        for s in specs:
            rec = None if force else stored_run(s, ignore_code=ignore_code)
            if rec is None:
                ready.append(s)
                continue
            res.skipped.append(s.name)
            log(f"up to date: {s.name}")
            finished(s, rec)

    def finished(s: RunSpec, rec: dict) -> None:
        res.records[(s.trace, s.budget, s.policy)] = rec
        if s.fraction is None and s.policy == "static":
            peak = rec["summary"]["live_peak_gib"]
            path = dict(traces)[s.trace]
            enqueue(spec(s.trace, path, f, float(f"{peak * f:.6g}"), p)
                    for f in fractions for p in policies)

    def failed(s: RunSpec, error: str) -> None:
        res.failures.append({"trace": s.trace, "budget": s.budget, "policy": s.policy,
                             "error": error})
        log(f"FAILED {s.name}: {error}")
        if s.fraction is None and s.policy == "static":
            for f in fractions:
                for p in policies:
                    res.failures.append({"trace": s.trace, "budget": budget_label(f),
                                         "policy": p, "error": "not run: the static run at the "
                                         "default budget failed, so the budget is unknown"})

    def priority(s: RunSpec):   # static defaults first (they unlock budgets), then by trace
        return (not (s.fraction is None and s.policy == "static"), order[s.trace])

    enqueue(spec(name, path, None, None, p) for name, path in traces for p in policies)
    if not inline:
        # Workers fork from a server that has imported the replay once (torch included, no
        # threads started yet), so a fresh process per run costs milliseconds, not an import.
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["bench.scarce_sweep", "bench.replay"])
    pool = (InlineExecutor() if inline else cf.ProcessPoolExecutor(
        jobs, mp_context=ctx, max_tasks_per_child=1))
    with pool:
        while ready or running:
            ready.sort(key=priority)
            while ready and len(running) < jobs:
                i = pick_next(ready, list(running.values()), memory_gib)
                if i is None:
                    break                   # the next runs wait for memory
                s = ready.pop(i)
                log(f"running: {s.name}")
                if memory_gib is not None and memory_estimate_gib(s) > memory_gib:
                    log(f"warning: {s.name} may need ~{memory_estimate_gib(s):.0f} GiB of "
                        f"host memory, more than --memory-gib {memory_gib:.0f}")
                try:
                    running[pool.submit(runner, s, jobs > 1)] = s
                except Exception as exc:    # a broken pool: every later run fails here
                    failed(s, f"not run: {exc!r}")
            if not running:
                continue
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: running[f].name):
                s = running.pop(fut)
                try:
                    rec = fut.result()
                except Exception as exc:    # one run's failure leaves the others running
                    failed(s, str(exc) or type(exc).__name__)
                    continue
                res.ran.append(s.name)
                log(f"done in {rec['wall_s']:.1f} s: {s.name}")
                finished(s, rec)
    return res


def entries(result: SweepResult, traces: Sequence[str], policies: Sequence[str],
            fractions: Sequence[float]) -> list[dict]:
    """One entry per (trace, budget) with at least one stored run, in (trace, budget)
    order: ``trace``, ``budget``, ``fraction``, ``kv_budget_gib``, ``live_peak_gib``
    (static's at the default budget), ``policies`` (summaries in ``policies`` order, mapped /
    live over static's live KV where static ran) and issue 9's ``scarce_targets``."""
    from bench import report

    out = []
    for tr in traces:
        static = result.records.get((tr, "default", "static"))
        peak = static["summary"]["live_peak_gib"] if static else None
        for f in (None, *fractions):
            recs = [result.records.get((tr, budget_label(f), p)) for p in policies]
            recs = [r for r in recs if r is not None]
            if not recs:
                continue
            summaries = [copy.deepcopy(r["summary"]) for r in recs]
            report.common_denominator(summaries, "static")
            windowed = [p for p in policies if p.startswith("windowed")]
            target = "windowed:empirical" if "windowed:empirical" in windowed else (
                windowed[0] if windowed else "")
            out.append({"trace": tr, "budget": budget_label(f), "fraction": f,
                        "kv_budget_gib": recs[0]["kv_budget_gib"], "live_peak_gib": peak,
                        "policies": summaries,
                        "scarce_targets": report.check_scarce_targets(summaries, target)})
    return out


def resolve_traces(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """(name, CSV path) for each ``--trace`` (a path or a shared trace name), in order, no
    repeats. Raises ValueError naming ``--trace`` for an unknown one or two traces that share
    a file name."""
    from bench.traces import resolve_trace

    found: dict[str, Path] = {}
    for t in specs:
        try:
            path = resolve_trace(t).resolve()
        except ValueError as exc:
            raise ValueError(f"--trace: {exc}") from None
        if path.stem in found and found[path.stem] != path:
            raise ValueError(f"--trace: two traces are named {path.stem!r} ({found[path.stem]} "
                             f"and {path}); their results would share a folder")
        found[path.stem] = path
    return list(found.items())


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.scarce_sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", action="append", required=True,
                    help="trace CSV path or shared trace name (" + ", ".join(SHARED_TRACES)
                         + "), repeatable")
    ap.add_argument("--fraction", type=float, action="append", default=None,
                    help="budget as a fraction of static's peak live KV at the default budget "
                         "(repeatable; default 0.25 and 0.125)")
    ap.add_argument("--policy", action="append", default=None,
                    help="policy to sweep, repeatable (default: " + ", ".join(DEFAULT_POLICIES)
                         + "); static is always run")
    ap.add_argument("--with-max-tokens", action="store_true",
                    help="also sweep windowed:max_tokens")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="host memory the runs at once may be expected to use (GiB; default "
                         "0.8 x MemAvailable at start); a run that needs more runs alone")
    ap.add_argument("--force", action="store_true", help="rerun runs already stored")
    ap.add_argument("--ignore-code-changes", action="store_true",
                    help="reuse stored runs made by other code (same arguments and trace)")
    ap.add_argument("--out", default="out/scarce")
    ap.add_argument("--no-plot", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep (see ``--help``); prints the combined table. Returns 0, 1 when a run
    failed (the rest is still written), or 2 on bad arguments (before any run)."""
    from bench import replay, scarce_report

    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        fractions = list(dict.fromkeys(args.fraction or DEFAULT_FRACTIONS))
        for f in fractions:
            cli_checks.check_number("--fraction", f, 0, 1, lo_open=True)
        cli_checks.check_count("--jobs", args.jobs, 64)
        policies = list(DEFAULT_POLICIES) if args.policy is None else ["static"]
        for p in args.policy or []:
            replay.parse_policy(p)
            policies += [p] if p not in policies else []
        if args.with_max_tokens and "windowed:max_tokens" not in policies:
            policies.append("windowed:max_tokens")
        clash = [o for o in extra if o.split("=")[0] in OWN_OPTIONS]
        if clash:
            raise ValueError(f"kv-replay options after --: {', '.join(clash)} are set by the "
                             f"sweep itself")
        try:   # the kv-replay options, checked before any run
            with contextlib.redirect_stderr(io.StringIO()) as err:
                replay._parser().parse_args(["--trace", "x", *extra])
        except SystemExit:
            raise ValueError("kv-replay options after --: "
                             + err.getvalue().strip().splitlines()[-1]) from None
        memory = args.memory_gib
        if memory is not None:
            cli_checks.check_number("--memory-gib", memory, 0, 1 << 20, lo_open=True)
        else:
            avail = available_memory_gib()
            memory = None if avail is None else 0.8 * avail
        traces = resolve_traces(args.trace)
        out = cli_checks.check_out_dir(args.out)
    except ValueError as exc:
        ap.error(str(exc))
    t0 = time.perf_counter()
    res = execute(traces, out, policies, fractions, extra, jobs=args.jobs, force=args.force,
                  ignore_code=args.ignore_code_changes, memory_gib=memory,
                  log=lambda m: print(f"[{time.perf_counter() - t0:7.1f} s] {m}",
                                      file=sys.stderr, flush=True))
    names = [n for n, _ in traces]
    budgets = [budget_label(f) for f in (None, *fractions)]

    def _order(key):
        return names.index(key[0]), budgets.index(key[1]), policies.index(key[2])

    ents = entries(res, names, policies, fractions)
    command = "python -m bench.scarce_sweep " + " ".join(given)
    runs = [{"trace": k[0], "budget": k[1], "policy": k[2], "kv_budget_gib": r["kv_budget_gib"],
             "wall_s": r["wall_s"], "cpu_s": r.get("cpu_s"),
             "process_max_rss_gib": r.get("process_max_rss_gib"),
             "stored": f"{k[0]} / {k[1]} / {k[2]}" in res.skipped}
            for k, r in sorted(res.records.items(), key=lambda kv: _order(kv[0]))]
    text = scarce_report.write(out, ents, res.failures, command=command,
                               plot_files=not args.no_plot, runs=runs)
    print(text)
    wall = time.perf_counter() - t0
    run_wall = sum(res.records[k]["wall_s"] for k in res.records
                   if f"{k[0]} / {k[1]} / {k[2]}" in res.ran)
    print(f"\n{len(res.ran)} runs replayed ({run_wall:.0f} s of run time), {len(res.skipped)} "
          f"up to date, {len(res.failures)} failed; {wall:.0f} s wall with --jobs {args.jobs}; "
          f"results in {out}/", file=sys.stderr)
    return 1 if res.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
