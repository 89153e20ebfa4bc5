"""Prefill attention throughput: paged Triton kernel vs torch SDPA on contiguous K/V.

Run ``python -m bench.bench_prefill [--out DIR] [--tiny]`` on a CUDA machine (writes
``prefill_attention.json`` in ``$OUT`` when set, else ``bench/results/``, after every row; a
failing row is recorded with its error and the rest go on), or ``pytest
bench/bench_prefill.py`` for the pytest-benchmark suite. Without CUDA both say so and do
nothing (exit status 0), except ``--tiny``: a CPU dry run through Triton's interpreter.
Both kernels are timed from CUDA-graph replays (the kernel, not the Python launch path),
with eager and host-launch figures beside.

Workload: whole prompts of length L in {512, 2048, 8192}, batch 16384 // L (16k query
tokens per launch: 32, 8 and 2 prompts), 32 query heads / 8 KV heads (GQA 4), head_dim
128, block_size 16, float16 and bfloat16. The paged cache holds the prompts' K/V in blocks
at randomly permuted ids, so every block table is non-contiguous.

FLOPs are counted exactly for the causal work done: query j (0-based) of sequence i sees
``ctx_i + j + 1`` keys, where ``ctx_i = seq_len_i - q_i``, and each (query, key, head) pair
costs ``2 * head_dim`` FLOPs for QK^T and ``2 * head_dim`` for PV:

    FLOPs = 4 * num_heads * head_dim * sum_i (q_i * ctx_i + q_i * (q_i + 1) / 2)

(for whole prompts ``ctx_i = 0``). The same count divides both kernels' times, so
``speed_vs_sdpa`` = SDPA time / paged time (> 1: the paged kernel is faster). The baseline is
``torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on
contiguous ``[B, H, L, D]`` tensors of the same prompts: the best attention torch picks
on this device, without paging.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

import kernels
from bench._common import ResultFile, bench_parser, copy_bandwidth, error_row, time_kernel
from kernels.prefill_attention import default_config

PROMPT_LENS = (512, 2048, 8192)
TOKENS_PER_LAUNCH = 16384
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPES = (torch.float16, torch.bfloat16)


def causal_flops(q_lens, seq_lens, num_heads: int, head_dim: int) -> float:
    """Exact FLOPs of causal attention where sequence i's q_i queries end its seq_len_i
    context (formula in the module docstring)."""
    pairs = sum(q * (s - q) + q * (q + 1) // 2 for q, s in zip(q_lens, seq_lens))
    return 4.0 * num_heads * head_dim * pairs


def make_workload(prompt_len: int, dtype: torch.dtype, device: str = "cuda", seed: int = 0,
                  tokens: int = TOKENS_PER_LAUNCH):
    """Inputs for both kernels: a dict with the paged call's arguments and SDPA's tensors;
    ``tokens // prompt_len`` prompts (at least one)."""
    g = torch.Generator(device=device).manual_seed(seed)
    batch = max(1, tokens // prompt_len)
    blocks_per_seq = -(-prompt_len // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    opts = dict(generator=g, device=device, dtype=dtype)
    q = torch.randn(batch, prompt_len, NUM_HEADS, HEAD_DIM, **opts)
    k = torch.randn(batch, prompt_len, NUM_KV_HEADS, HEAD_DIM, **opts)
    v = torch.randn_like(k)
    # Scatter the prompts' K/V into blocks at random ids.
    ids = torch.randperm(num_blocks, generator=g, device=device).to(torch.int32)
    table = ids.view(batch, blocks_per_seq)
    kv = torch.zeros(num_blocks, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    pad = blocks_per_seq * BLOCK_SIZE - prompt_len
    for which, src in ((0, k), (1, v)):
        padded = torch.nn.functional.pad(src, (0, 0, 0, 0, 0, pad))
        kv[table.long().view(-1), which] = padded.reshape(-1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    seq_lens = torch.full((batch,), prompt_len, dtype=torch.int32, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * prompt_len
    return {
        "paged": (q.reshape(-1, NUM_HEADS, HEAD_DIM), kv, table, seq_lens, qsl),
        "sdpa": (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                 v.transpose(1, 2).contiguous()),
        "batch": batch,
        "flops": causal_flops([prompt_len] * batch, [prompt_len] * batch, NUM_HEADS, HEAD_DIM),
    }


def paged_fn(work):
    query, kv, table, seq_lens, qsl = work["paged"]
    out = torch.empty_like(query)
    return lambda: kernels.paged_prefill_attention(query, kv, table, seq_lens, qsl, out=out)


def sdpa_fn(work):
    q, k, v = work["sdpa"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)


def check_agreement(work) -> float:
    """Max abs difference between the paged kernel and SDPA on this workload (sanity)."""
    got = paged_fn(work)()
    q = work["sdpa"][0]
    ref = sdpa_fn(work)().transpose(1, 2).reshape(-1, NUM_HEADS, HEAD_DIM)
    assert got.shape == ref.shape, (got.shape, ref.shape, q.shape)
    return float((got.float() - ref.float()).abs().max())


def _head(prompt_len: int, dtype: torch.dtype) -> dict:
    return {"dtype": str(dtype).replace("torch.", ""), "prompt_len": prompt_len}


def measure(prompt_len: int, dtype: torch.dtype, *, tokens: int = TOKENS_PER_LAUNCH,
            device: str = "cuda") -> dict:
    """One (dtype, prompt length) row: both kernels timed from CUDA-graph replays
    (``*_ms``), with eager and host-launch figures in ``paged``/``sdpa``."""
    work = make_workload(prompt_len, dtype, device=device, tokens=tokens)
    err = check_agreement(work)
    paged = time_kernel(paged_fn(work))
    sdpa = time_kernel(sdpa_fn(work))
    t_paged, t_sdpa = paged["kernel_s"], sdpa["kernel_s"]
    row = {
        **_head(prompt_len, dtype),
        "batch": work["batch"],
        "flops": work["flops"],
        "paged_ms": t_paged * 1e3,
        "sdpa_ms": t_sdpa * 1e3,
        "paged": paged,
        "sdpa": sdpa,
        "paged_tflops": work["flops"] / t_paged / 1e12,
        "sdpa_tflops": work["flops"] / t_sdpa / 1e12,
        "speed_vs_sdpa": t_sdpa / t_paged,
        "max_abs_diff_vs_sdpa": err,
        "tile_config": dataclasses.asdict(default_config(
            HEAD_DIM, NUM_HEADS // NUM_KV_HEADS, dtype)),
    }
    del work
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


WORKLOAD = {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE, "tokens_per_launch": TOKENS_PER_LAUNCH,
            "block_tables": "random permutation of block ids",
            "flops_formula": "4*H*D*sum_i(q_i*ctx_i + q_i*(q_i+1)/2)",
            "timing": "*_ms = median of CUDA-graph replays; eager and host-launch figures in "
                      "'paged'/'sdpa'",
            "baseline": "torch SDPA is_causal=True enable_gqa=True, contiguous K/V"}
#: The dry-run case (CPU, Triton's interpreter): prompt length and tokens per launch.
TINY = (32, 64)


def run(out_dir=None, *, tiny: bool = False) -> list[dict]:
    """Measure every (dtype, prompt length), writing ``prefill_attention.json`` after each
    row; a failing row is recorded with its error and the rest go on. ``tiny``: one small
    case on CPU (a dry run of the plumbing)."""
    device = "cpu" if tiny else "cuda"
    res = ResultFile("prefill_attention", out_dir, workload=WORKLOAD)
    res.set("copy_bandwidth_bytes_per_s",
            copy_bandwidth(1 << 20 if tiny else 1 << 30, device=device))
    cases = [(torch.float16, TINY[0])] if tiny else [(d, L) for d in DTYPES for L in PROMPT_LENS]
    rows = []
    for dtype, prompt_len in cases:
        try:
            row = measure(prompt_len, dtype, device=device,
                          tokens=TINY[1] if tiny else TOKENS_PER_LAUNCH)
            print(f"{row['dtype']:>8} L={prompt_len:>5} batch={row['batch']:>2}  "
                  f"paged {row['paged_ms']:7.3f} ms {row['paged_tflops']:6.1f} TFLOP/s "
                  f"(host {row['paged']['host_launch_s'] * 1e6:.0f} us)  "
                  f"sdpa {row['sdpa_ms']:7.3f} ms {row['sdpa_tflops']:6.1f} TFLOP/s  "
                  f"x{row['speed_vs_sdpa']:.2f}  maxdiff {row['max_abs_diff_vs_sdpa']:.2e}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - one failed case keeps the others
            row = {**_head(prompt_len, dtype), **error_row(exc)}
            print(f"{row['dtype']:>8} L={prompt_len:>5}: FAILED {row['error']}", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        res.add("results", row)
    print(f"wrote {res.path}")
    return rows


def main(argv=None) -> int:
    args = bench_parser(__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("bench_prefill: no CUDA device; this benchmark needs a GPU (nothing measured).")
        return 0
    rows = run(args.out, tiny=args.tiny)
    return 1 if any("error" in r for r in rows) else 0


# ---------------------------------------------------------------- pytest-benchmark suite
try:
    import pytest
except ImportError:  # pragma: no cover - the script path needs no pytest
    pytest = None

if pytest is not None:
    _needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @_needs_cuda
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
    @pytest.mark.parametrize("prompt_len", PROMPT_LENS)
    @pytest.mark.parametrize("impl", ["paged", "sdpa"])
    def test_prefill_throughput(benchmark, impl, prompt_len, dtype):
        work = make_workload(prompt_len, dtype)
        fn = paged_fn(work) if impl == "paged" else sdpa_fn(work)
        fn()

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.extra_info["flops"] = work["flops"]
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3)
        benchmark.extra_info["tflops"] = work["flops"] / benchmark.stats.stats.median / 1e12


if __name__ == "__main__":
    sys.exit(main())
