"""Offline throughput of the engine against transformers' batched ``generate``.

Workload (GPU default): 256 sequences, prompt 512 random tokens, 256 output tokens each
(``ignore_eos``), Llama-3-8B geometry with random weights in bf16, greedy. Reports output
tokens per second (generated tokens / wall seconds of ``generate``, warm: a short run first
compiles the kernels and captures the CUDA graphs) for memory policies ``static`` and
``windowed`` and for transformers' ``generate`` over the same prompts in one batch (its
default attention and cache), plus the ratios the issue targets: windowed within 2% of
static, the engine >= 5x transformers.

    python -m bench.bench_engine                 # GPU, writes bench/results/engine.json
    python -m bench.bench_engine --smoke         # CPU-sized: tiny model, 4 x (16 + 8) tokens
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench._common import write_result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_throughput(model, prompts, max_tokens: int, policy: str, args) -> dict:
    """Output tokens/s of :class:`engine.LLM` on ``prompts`` (warm run timed)."""
    from engine import LLM, SamplingParams

    llm = LLM(model, model.device, block_size=16, max_num_seqs=len(prompts),
              max_num_batched_tokens=args.max_num_batched_tokens, memory_policy=policy,
              kv_cache_memory_bytes=args.kv_cache_bytes, seed=0)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:min(8, len(prompts))], SamplingParams(max_tokens=4, ignore_eos=True))
    _sync(model.device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    _sync(model.device)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    c = llm.loop.metrics.counters
    res = {"policy": policy, "output_tokens": tokens, "wall_s": wall,
           "tokens_per_s": tokens / wall, "steps": c.steps, "preemptions": c.preemptions,
           "mapped_peak_bytes": int(max(llm.loop.metrics.timeline.arrays()["mapped_bytes"])),
           "map_calls": c.map_calls, "unmap_calls": c.unmap_calls}
    llm.close()
    return res


def transformers_throughput(cfg, prompts, max_tokens: int, dtype, device) -> dict:
    """Output tokens/s of transformers' batched ``generate`` (one batch, greedy, random
    weights at ``cfg``'s geometry)."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    cfg_cls, model_cls = cls[cfg.model_type]
    hf_cfg = cfg_cls(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                     eos_token_id=None, pad_token_id=0, sliding_window=None)
    with torch.device(device):
        model = model_cls(hf_cfg).to(dtype).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=2, **kw)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, **kw)
        _sync(device)
    wall = time.perf_counter() - t0
    tokens = int(out.shape[0] * (out.shape[1] - ids.shape[1]))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"policy": "transformers.generate", "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall}


def main(argv=None) -> int:
    """Run the benchmark; prints a table and writes ``<out>/engine.json``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized configuration")
    p.add_argument("--model", default=None, help="preset (default llama-3-8b; tiny-llama "
                   "with --smoke)")
    p.add_argument("--num-seqs", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--no-transformers", action="store_true", help="skip the baseline")
    p.add_argument("--out", default=None, help="output folder (default bench/results)")
    args = p.parse_args(argv)
    from engine import load_model

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running the --smoke configuration", file=sys.stderr)
        args.smoke = True
    n = args.num_seqs or (4 if args.smoke else 256)
    plen = args.prompt_len or (16 if args.smoke else 512)
    olen = args.output_len or (8 if args.smoke else 256)
    name = args.model or ("tiny-llama" if args.smoke else "llama-3-8b")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    args.kv_cache_bytes = int((args.kv_cache_gib or (0.0625 if args.smoke else 40.0)) * (1 << 30))
    model = load_model(f"{name}:random", dtype=dtype, device=device, seed=0)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (n, plen), generator=gen).tolist()
    rows = [engine_throughput(model, prompts, olen, pol, args) for pol in ("static", "windowed")]
    try:
        import transformers
        versions = {"transformers": transformers.__version__}
    except ImportError:   # lent GPU machines may not have it: the engine's rows still count
        versions = {"transformers": "unavailable"}
        args.no_transformers = True
    if not args.no_transformers:
        cfg = model.cfg
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(transformers_throughput(cfg, prompts, olen, dtype, device))
    by = {r["policy"]: r["tokens_per_s"] for r in rows}
    ratios = {"windowed_over_static": by["windowed"] / by["static"]}
    if "transformers.generate" in by:
        ratios["engine_static_over_transformers"] = by["static"] / by["transformers.generate"]
    payload = {"workload": {"model": f"{name}:random", "dtype": str(dtype), "num_seqs": n,
                            "prompt_len": plen, "output_len": olen, "greedy": True},
               "results": rows, "ratios": ratios,
               "targets": {"windowed_over_static": ">= 0.98",
                           "engine_static_over_transformers": ">= 5"}}
    payload["versions"] = versions
    path = write_result("engine" + ("_smoke" if args.smoke else ""), payload,
                        Path(args.out) if args.out else None)
    for r in rows:
        print(f"{r['policy']:>24}: {r['tokens_per_s']:10.1f} output tok/s "
              f"({r['output_tokens']} tokens in {r['wall_s']:.2f} s)")
    print("ratios:", {k: round(v, 3) for k, v in ratios.items()}, f"-> {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
