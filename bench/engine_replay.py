"""Trace replay with the real engine: ``kv-replay --engine model --model PRESET``.

Instead of the step model, every step is a real forward pass of :class:`engine.LLM` over the
batch the scheduler formed (random weights at the preset's geometry, random prompt tokens of
the trace's lengths, each request stopped at the trace's output length as if by EOS), so step
times are measured and map/unmap/compaction are the arena's real costs (CUDA virtual memory
on a GPU; the host mmap backend on the CPU). The loop's clock is that measured time, so a
CPU replays the trace far slower than a GPU would: on the CPU use a tiny model and a short
slice (the defaults). Reports the same table as the step-model replay.

    kv-replay --engine model --model tiny-llama --max-requests 8          # CPU, seconds
    kv-replay --engine model --model llama-3-8b --max-requests 200        # GPU
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import numpy as np

from bench import report
from bench.traces import Trace, load_trace


def wants_engine(argv: Sequence[str] | None) -> bool:
    """True when the command line asks for ``--engine model`` (bench.replay hands over)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return any(a == "--engine" or a.startswith("--engine=") for a in args)


def _parser() -> argparse.ArgumentParser:
    from engine import PRESETS

    p = argparse.ArgumentParser(prog="kv-replay --engine model", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine", required=True, choices=("model",),
                   help="'model': real forward passes through engine.LLM")
    p.add_argument("--model", default=None, help="engine preset (random weights): "
                   + ", ".join(PRESETS) + "; default tiny-llama on CPU, llama-3-8b on CUDA")
    p.add_argument("--trace", default=None, help="trace CSV or shared trace name (default: "
                   "the embedded Azure slice)")
    p.add_argument("--max-requests", type=int, default=None,
                   help="first N requests (default 8 on CPU, 200 on CUDA)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="clip prompts (default 256 on CPU, none on CUDA)")
    p.add_argument("--max-output-tokens", type=int, default=None,
                   help="clip outputs (default 32 on CPU, none on CUDA)")
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="max_tokens of every request (what max_tokens predictors see)")
    p.add_argument("--policy", action="append", default=None,
                   help="static, on-demand, windowed:<predictor> (repeatable; default "
                        "static, on-demand, windowed:empirical)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV arena size and cap (default 1/64 GiB on CPU, 40 GiB on CUDA)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/replay_engine", help="output folder")
    p.add_argument("--quiet", action="store_true")
    return p


def run_policy(model, trace, policy: str, args) -> report.RunRecord:
    """Replay ``trace`` through a fresh :class:`engine.LLM` (sharing ``model``'s weights)
    under ``policy``; returns what it recorded (times on the measured clock)."""
    from engine import LLM, SamplingParams

    memory, _, pred = policy.partition(":")
    cuda = model.device.type == "cuda"
    llm = LLM(model, model.device, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
              memory_policy=memory, predictor=pred or "max_tokens",
              kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)),
              max_model_len=int(trace.prompt_tokens.max()) + args.max_tokens,
              arena_granularity=None if cuda else 64 << 10)
    rng = np.random.default_rng(args.seed)
    vocab = model.cfg.vocab_size
    sp = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    wall0 = time.perf_counter()
    rids = [llm.add_request(rng.integers(0, vocab, int(p)).tolist(), sp, arrival_s=float(a),
                            stop_after=min(int(o), args.max_tokens))
            for a, p, o in zip(trace.arrival_s, trace.prompt_tokens, trace.output_tokens)]
    llm.loop.run()
    wall = time.perf_counter() - wall0
    reqs = [llm.step.seqs[r].request for r in rids]
    m = llm.loop.metrics
    tl = m.timeline.arrays()
    c = m.counters
    st = llm.arena.stats()   # wall-clock seconds the arena spent in each operation
    counters = {**c.as_dict(), "time_map_s": st["time_map_s"], "time_unmap_s": st["time_unmap_s"],
                "time_compact_s": st["time_compact_s"],
                "mispredictions": c.lease_misses if memory == "windowed" else None}
    counters = {k: v for k, v in counters.items() if v is not None}
    record = report.RunRecord(
        policy=policy, t_s=tl["t_s"], mapped_bytes=tl["mapped_bytes"],
        live_bytes=tl["live_bytes"], used_bytes=tl["used_bytes"], start_s=m.start_s,
        end_s=max(m.end_s, float(tl["t_s"][-1])), arrival_s=trace.arrival_s,
        first_token_s=np.array([r.first_token_s for r in reqs]),
        finish_s=np.array([r.finish_s for r in reqs]),
        output_tokens=np.array([r.generated for r in reqs]), counters=counters,
        info={"memory": memory, "predictor": pred or None, "wall_s": wall, "steps": c.steps,
              "model_time_s": c.model_time_s, "arena_time_s": c.arena_time_s,
              "chunk_bytes": llm.arena.chunk_bytes})
    llm.close()
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Run the engine replay; prints the table and writes ``<out>/replay.json`` and
    ``<out>/table.md``. Returns 0, or 2 on bad arguments."""
    import torch

    from engine import load_model

    from bench import cli_checks
    from scheduler.predictor import PREDICTORS

    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    policies = args.policy or ["static", "on-demand", "windowed:empirical"]
    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}") from None
        if dev.type not in ("cpu", "cuda") or (dev.type == "cuda"
                                                and not torch.cuda.is_available()):
            raise ValueError(f"--device must be cpu, or cuda on a machine with CUDA; "
                             f"got {device!r}")
        cpu = dev.type == "cpu"
        for pol in policies:
            mem, _, pred = pol.partition(":")
            if mem not in ("static", "on-demand", "windowed") or (pred and mem != "windowed"):
                raise ValueError(f"--policy must be static, on-demand or windowed[:predictor], "
                                 f"got {pol!r}")
            if pred and pred not in PREDICTORS.names:
                raise ValueError(f"--policy {pol!r}: the predictor must be one of "
                                 f"{', '.join(PREDICTORS.names)}")
        for name in ("max_requests", "max_prompt_tokens", "max_output_tokens", "max_tokens"):
            v = getattr(args, name)
            if v is not None:
                cli_checks.check_count(f"--{name.replace('_', '-')}", v, cli_checks.MAX_MODEL_LEN)
        cli_checks.check_count("--block-size", args.block_size, cli_checks.MAX_BLOCK_SIZE)
        cli_checks.check_count("--max-num-seqs", args.max_num_seqs, cli_checks.MAX_RUNNING)
        cli_checks.check_count("--max-num-batched-tokens", args.max_num_batched_tokens,
                          cli_checks.MAX_TOKEN_BUDGET)
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if args.kv_cache_gib is None:
            args.kv_cache_gib = 1 / 64 if cpu else 40.0
        cli_checks.check_number("--kv-cache-gib", args.kv_cache_gib, 0,
                           cli_checks.MAX_DEVICE_MEMORY_GIB, lo_open=True)
        out = cli_checks.check_out_dir(args.out)
        trace = load_trace(args.trace)
        trace = trace.head(args.max_requests or (8 if cpu else 200))
        clip_p = args.max_prompt_tokens or (256 if cpu else None)
        clip_o = args.max_output_tokens or (32 if cpu else None)
        trace = Trace(trace.name, trace.source, trace.arrival_s,
                      np.minimum(trace.prompt_tokens, clip_p or np.iinfo(np.int64).max),
                      np.minimum(trace.output_tokens, clip_o or np.iinfo(np.int64).max))
        model = load_model(f"{args.model or ('tiny-llama' if cpu else 'llama-3-8b')}:random",
                           dtype=args.dtype, device=device, seed=args.seed)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    cfg = model.cfg
    head = [f"trace: {trace.name}, first {len(trace)} requests"
            + (f", prompts clipped to {clip_p}" if clip_p else "")
            + (f", outputs clipped to {clip_o} tokens" if clip_o else ""),
            f"engine: {args.model or ('tiny-llama' if cpu else 'llama-3-8b')} (random weights, "
            f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {model.dtype}) on {device}; "
            f"step times measured, arena operations wall-clock",
            f"KV arena {args.kv_cache_gib:.4g} GiB, block {args.block_size} tokens, "
            f"{args.max_num_seqs} seqs, {args.max_num_batched_tokens} tokens per step"]
    if not args.quiet:
        print("\n".join(head), file=sys.stderr)
    try:  # the engine and arena check what is left (e.g. a KV cap below one block)
        runs = [run_policy(model, trace, p, args) for p in policies]
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    summaries = [report.summarize(r) for r in runs]
    table = report.markdown_table(summaries)
    from bench._common import environment
    text = "\n".join(f"- {h}" for h in head) + "\n\n" + table + "\n"
    result = {"environment": environment(device), "command": "kv-replay " + " ".join(
        sys.argv[1:] if argv is None else argv), "setup": head, "trace": trace.describe(),
        "policies": summaries}
    cli_checks.write_all_or_nothing(out, {
        "replay.json": lambda p: report.write_json(p, result),
        "table.md": lambda p: p.write_text(text)})
    print(text)
    return 0
