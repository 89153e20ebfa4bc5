"""Decode attention microbenchmark: kernels.paged_decode_attention on a GPU.

For batch {1, 8, 32, 128} x context {512, 2k, 8k, 32k} tokens, 32 query / 8 KV heads,
head_dim 128, block 16, fp16 and bf16, random non-contiguous block tables, it reports:

* ``seconds``: the kernel's median time from CUDA-graph replays
  (``triton.testing.do_bench_cudagraph``), so the ~0.2 ms host path of the Python wrapper
  does not hide a 5-30 us kernel; ``ours.eager_s`` (eager, CUDA events) and
  ``ours.host_launch_s`` (host wall time per call: the launch overhead) are reported beside.
* ``kv_bytes_per_s``: K and V bytes the kernel must read (every sequence's whole context),
  divided by ``seconds``; ``ratio_to_copy`` is that rate over ``copy_bandwidth()``
  (bytes read + written per second by ``Tensor.copy_``) measured in the same run. Graph
  replays re-read the same K/V, so where ``kv_fits_in_l2`` the rate is L2's, not HBM's.
* ``time_ratio_vs_sdpa``: our time / the time of torch's ``scaled_dot_product_attention``
  over the same K/V gathered contiguous (only SDPA is timed, not the gather), both from
  graph replays; < 1 is faster. ``eager_time_ratio_vs_sdpa``: the same for eager calls.
* ``--flex``: on a few shapes (:data:`FLEX_SHAPES`; each costs a ``torch.compile``), the same
  against FlexAttention reading the paged cache through a block mask built from the block
  tables, or ``"unavailable: <reason>"``; written to ``flex_attention.json``.

Run: ``python -m bench.bench_decode [--quick | --tiny] [--flex] [--out DIR]`` (writes
``decode_attention.json`` in ``$OUT`` when set, else ``bench/results/``, after every shape;
a failing shape is recorded with its error and the rest go on), or as a pytest-benchmark
suite: ``python -m pytest bench/bench_decode.py --benchmark-only`` (skips without CUDA).
Shapes whose cache (plus the gathered copy for SDPA) would not fit in free memory are
skipped and recorded as such. ``--tiny`` is a CPU dry run (Triton's interpreter).
"""
from __future__ import annotations

import math
import sys

import torch

import kernels
from bench._common import ResultFile, bench_parser, copy_bandwidth, error_row, time_kernel

BATCHES = (1, 8, 32, 128)
CONTEXTS = (512, 2048, 8192, 32768)
DTYPES = (torch.float16, torch.bfloat16)
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16


def make_inputs(batch: int, context: int, dtype: torch.dtype, device: str = "cuda",
                seed: int = 0) -> dict:
    """Query, a cache holding exactly the batch's blocks, shuffled block tables, lengths.

    Every sequence has ``context`` tokens (the current one included); its blocks are a
    random, non-contiguous subset of the cache.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    cache = torch.empty(num_blocks, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype,
                        device=device)
    cache.normal_(generator=g)
    ids = torch.randperm(num_blocks, generator=g, device=device)[:batch * per_seq]
    return dict(query=torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=g, device=device,
                                  dtype=dtype),
                kv_cache=cache, block_tables=ids.view(batch, per_seq).to(torch.int32),
                seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device))


def kv_bytes(batch: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of K and V a decode step must read: every token of every sequence, once."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * itemsize


def gather_contiguous(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the batch as dense ``[batch, kv_heads, context, head_dim]`` tensors."""
    cache, table = inp["kv_cache"], inp["block_tables"].long()
    batch, context = table.shape[0], int(inp["seq_lens"][0])
    k = cache[table, 0].reshape(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context]
    v = cache[table, 1].reshape(batch, -1, NUM_KV_HEADS, HEAD_DIM)[:, :context]
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def sdpa_fn(inp: dict):
    """A call of torch SDPA on the gathered K/V (GQA through enable_gqa, else repeated K/V)."""
    import torch.nn.functional as F

    k, v = gather_contiguous(inp)
    q = inp["query"].unsqueeze(2)  # [batch, heads, 1, head_dim]
    try:
        F.scaled_dot_product_attention(q[:1], k[:1], v[:1], enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except (TypeError, RuntimeError):  # torch without enable_gqa: 4x the K/V memory
        rep = NUM_HEADS // NUM_KV_HEADS
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return lambda: F.scaled_dot_product_attention(q, k, v)


def flex_fn(inp: dict):
    """A compiled FlexAttention call over the paged cache itself.

    The cache's K (and V) is viewed as one long physical sequence ``[1, kv_heads,
    num_blocks * block_size, head_dim]`` shared by the batch; the block mask's column
    blocks are cache blocks (BLOCK_SIZE = block_size), and row b lists sequence b's blocks
    from its block table. All contexts here fill whole blocks, so every listed block is a
    full block and no mask_mod is needed. Raises whatever flex raises where unsupported.
    """
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    cache, table = inp["kv_cache"], inp["block_tables"]
    batch, per_seq = table.shape
    num_blocks = cache.shape[0]
    if int(inp["seq_lens"][0]) % BLOCK_SIZE:
        raise ValueError("flex comparison needs contexts that fill whole blocks")
    phys = num_blocks * BLOCK_SIZE
    k = cache[:, 0].permute(2, 0, 1, 3).reshape(1, NUM_KV_HEADS, phys, HEAD_DIM)
    v = cache[:, 1].permute(2, 0, 1, 3).reshape(1, NUM_KV_HEADS, phys, HEAD_DIM)
    dev = cache.device
    full_num = torch.full((batch, 1, 1), per_seq, dtype=torch.int32, device=dev)
    full_idx = table.view(batch, 1, 1, per_seq).contiguous()
    none_num = torch.zeros_like(full_num)
    none_idx = torch.zeros_like(full_idx)
    # Which sequence owns each cache block: the mask_mod for paths that ignore block
    # sparsity (flex's eager reference); the compiled kernel skips it on full blocks.
    owner = torch.full((num_blocks,), -1, dtype=torch.int32, device=dev)
    owner[table.flatten().long()] = torch.arange(batch, dtype=torch.int32,
                                                 device=dev).repeat_interleave(per_seq)

    def owned(b, h, q_idx, kv_idx):
        return owner[kv_idx // BLOCK_SIZE] == b

    mask = BlockMask.from_kv_blocks(none_num, none_idx, full_num, full_idx,
                                    BLOCK_SIZE=(128, BLOCK_SIZE), mask_mod=owned,
                                    seq_lengths=(1, phys),
                                    compute_q_blocks=False)  # forward only
    q = inp["query"].unsqueeze(2)
    # One compile per shape: past dynamo's recompile limit flex would silently run eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    compiled = torch.compile(flex_attention, dynamic=False)
    compiled(q, k, v, block_mask=mask, enable_gqa=True)  # compile (and fail) outside timing
    return lambda: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def _fits(batch: int, context: int, dtype: torch.dtype) -> bool:
    # Cache + gathered copy for SDPA + SDPA's working set, with a margin.
    if not torch.cuda.is_available():
        return True
    free, _ = torch.cuda.mem_get_info()
    return 2.3 * kv_bytes(batch, context, dtype) < 0.9 * free


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _head(batch: int, context: int, dtype: torch.dtype) -> dict:
    return dict(batch=batch, context=context, dtype=str(dtype).replace("torch.", ""),
                num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
                block_size=BLOCK_SIZE)


def _compare(batch: int, context: int, dtype: torch.dtype, name: str, make_baseline) -> dict:
    """Our kernel and a baseline (``make_baseline(inputs)`` returns a no-argument call) on
    one shape, both timed with :func:`bench._common.time_kernel`; the row names the
    baseline's figures ``<name>``, ``<name>_seconds``, ``time_ratio_vs_<name>`` (graph
    replays), ``eager_time_ratio_vs_<name>`` and ``max_abs_diff_vs_<name>``."""
    row = _head(batch, context, dtype)
    if not _fits(batch, context, dtype):
        row["skipped"] = "does not fit in free device memory"
        return row
    inp = make_inputs(batch, context, dtype, device=_device())
    out = torch.empty_like(inp["query"])
    step = lambda: kernels.paged_decode_attention(**inp, out=out)  # noqa: E731
    step()  # compile outside the timing
    ours = time_kernel(step)
    row.update(seconds=ours["kernel_s"], ours=ours)
    try:
        fn = make_baseline(inp)
        ref = fn().squeeze(2)
        row[f"max_abs_diff_vs_{name}"] = float((ref.float() - out.float()).abs().max())
        base = time_kernel(fn)
        row.update({name: base, f"{name}_seconds": base["kernel_s"],
                    f"time_ratio_vs_{name}": ours["kernel_s"] / base["kernel_s"],
                    f"eager_time_ratio_vs_{name}": ours["eager_s"] / base["eager_s"]})
        del fn, ref
    except Exception as e:  # noqa: BLE001 - any failure is data for the table
        row[f"time_ratio_vs_{name}"] = f"unavailable: {type(e).__name__}: {str(e)[:200]}"
    del inp, out
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def measure(batch: int, context: int, dtype: torch.dtype) -> dict:
    """One shape's figures against SDPA (see the module docstring), as a JSON-ready dict.

    ``seconds`` is the kernel's time from CUDA-graph replays; ``ours`` holds the eager and
    host-launch figures too (:func:`bench._common.time_kernel`). SDPA is timed the same way.
    """
    row = _compare(batch, context, dtype, "sdpa", sdpa_fn)
    if "seconds" in row:
        nbytes = kv_bytes(batch, context, dtype)
        row.update(kv_bytes=nbytes, kv_bytes_per_s=nbytes / row["seconds"])
        if torch.cuda.is_available():
            # Graph replays re-read the same K/V: below the L2 size that is a cache-hot
            # figure (eager timings flush L2 between calls, graph replays do not).
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
            row["kv_fits_in_l2"] = bool(l2) and nbytes <= l2
    return row


def measure_flex(batch: int, context: int, dtype: torch.dtype) -> dict:
    """Our kernel against compiled FlexAttention over the same paged cache, both timed
    from CUDA-graph replays (the compile happens before, outside the timing)."""
    if not torch.cuda.is_available():
        return {**_head(batch, context, dtype),
                "skipped": "FlexAttention is compared on a GPU only (torch.compile)"}
    return _compare(batch, context, dtype, "flex", flex_fn)


#: The few shapes compared with FlexAttention: each costs a torch.compile (tens of seconds).
FLEX_SHAPES = ((torch.float16, 8, 2048), (torch.bfloat16, 32, 8192))
#: The dry-run shape (CPU, Triton's interpreter): the plumbing, not the numbers.
TINY_SHAPES = ((torch.float16, 1, 32),)


def run(quick: bool = False, out_dir=None, *, tiny: bool = False) -> list[dict]:
    """Measure the whole grid (a 2 x 2 corner with ``quick``, one tiny CPU shape with
    ``tiny``) against SDPA, writing ``decode_attention.json`` after every shape. A shape
    that fails is recorded with its error and the rest go on."""
    if tiny:
        shapes = TINY_SHAPES
    else:
        batches, contexts = ((1, 32), (2048, 32768)) if quick else (BATCHES, CONTEXTS)
        shapes = tuple((d, b, c) for d in DTYPES for b in batches for c in contexts)
    res = ResultFile("decode_attention", out_dir, workload=dict(
        num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE, timing="seconds = median of CUDA-graph replays; eager and "
        "host-launch figures beside it", baseline="torch SDPA on K/V gathered contiguous"))
    bw = copy_bandwidth(1 << 20 if tiny else 1 << 30, device=_device())
    res.set("copy_bandwidth_Bps", bw)
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for dtype, batch, context in shapes:
        try:
            row = measure(batch, context, dtype)
        except Exception as e:  # noqa: BLE001 - one failed shape keeps the others
            row = {**_head(batch, context, dtype), **error_row(e)}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if "kv_bytes_per_s" in row:
            row["ratio_to_copy"] = row["kv_bytes_per_s"] / bw
        rows.append(row)
        res.add("results", row)
        print(_line(row), flush=True)
    print(f"written {res.path}")
    return rows


def run_flex(out_dir=None, *, tiny: bool = False) -> list[dict]:
    """The FlexAttention comparison on :data:`FLEX_SHAPES`, written to
    ``flex_attention.json`` after every shape."""
    res = ResultFile("flex_attention", out_dir, workload=dict(
        num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
        block_size=BLOCK_SIZE, timing="median of CUDA-graph replays, compile excluded",
        baseline="torch.compile(flex_attention) over the paged cache with a block mask "
                 "built from the block tables"))
    rows = []
    for dtype, batch, context in (TINY_SHAPES if tiny else FLEX_SHAPES):
        try:
            row = measure_flex(batch, context, dtype)
        except Exception as e:  # noqa: BLE001
            row = {**_head(batch, context, dtype), **error_row(e)}
        rows.append(row)
        res.add("results", row)
        print(_line(row), flush=True)
    print(f"written {res.path}")
    return rows


def _line(r: dict) -> str:
    head = f"{r['dtype']:>8} batch {r['batch']:>3} ctx {r['context']:>5}"
    if "skipped" in r:
        return f"{head}: skipped ({r['skipped']})"
    if "error" in r:
        return f"{head}: FAILED {r['error']}"

    def ratio(key):
        x = r.get(key)
        return f"{x:.2f}" if isinstance(x, float) else "n/a"
    text = (f"{head}: {r['seconds'] * 1e6:8.1f} us (host {r['ours']['host_launch_s'] * 1e6:.0f}"
            f" us)")
    if "kv_bytes_per_s" in r:
        text += (f"  {r['kv_bytes_per_s'] / 1e9:7.0f} GB/s  x copy "
                 f"{r.get('ratio_to_copy', float('nan')):.2f}  time/sdpa "
                 f"{ratio('time_ratio_vs_sdpa')}")
    if "time_ratio_vs_flex" in r:
        text += f"  time/flex {ratio('time_ratio_vs_flex')}"
    return text


def main(argv=None) -> int:
    p = bench_parser(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a 2 x 2 corner of the grid")
    p.add_argument("--flex", action="store_true", help="only the FlexAttention comparison "
                   "(a few shapes; writes flex_attention.json)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("bench.bench_decode needs a CUDA device (the kernel's CPU path is Triton's "
              "interpreter, whose timings mean nothing); no result written.", file=sys.stderr)
        return 2
    if args.flex:
        rows = run_flex(args.out, tiny=args.tiny)
    else:
        rows = run(quick=args.quick, out_dir=args.out, tiny=args.tiny)
    return 1 if any("error" in r for r in rows) else 0


# --- pytest-benchmark: ``python -m pytest bench/bench_decode.py --benchmark-only`` ---------
try:
    import pytest
except ImportError:  # running as a script without the test extras
    pytest = None

if pytest is not None:
    pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

    @pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
    @pytest.mark.parametrize("context", CONTEXTS)
    @pytest.mark.parametrize("batch", BATCHES)
    def test_bench_paged_decode(benchmark, batch, context, dtype):
        if not _fits(batch, context, dtype):
            pytest.skip("does not fit in free device memory")
        inp = make_inputs(batch, context, dtype)
        out = torch.empty_like(inp["query"])

        def step():
            kernels.paged_decode_attention(**inp, out=out)
            torch.cuda.synchronize()

        step()
        benchmark.pedantic(step, rounds=30, warmup_rounds=3)
        nbytes = kv_bytes(batch, context, dtype)
        benchmark.extra_info.update(kv_bytes=nbytes,
                                    kv_bytes_per_s=nbytes / benchmark.stats.stats.median)


if __name__ == "__main__":
    sys.exit(main())
