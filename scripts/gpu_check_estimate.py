"""Estimate, without a GPU, the Triton compile time of each benchmark step of gpu_check.sh.

Method: a stand-in driver makes Triton's JIT believe the current device is an sm_90 GPU;
every kernel launch then goes through the JIT's own binder (so the specialisation key is the
one a real launch on an H100/H200 would produce: dtypes, constexprs, 16-divisibility and
==1 of integer arguments, pointer alignment) and is compiled, not launched (``warmup``).
The benchmarks' launchers are driven over their real shape grids with ``meta`` tensors
(shapes and strides, no memory), and the decode split count is chosen for an H200's 132
SMs. Each distinct specialisation is compiled once, cold (a fresh Triton cache), and
timed; the report gives count and seconds per step.

    python scripts/gpu_check_estimate.py            # prints a table and a JSON line

A launch that fails to compile is listed as a compile error (it would fail on the GPU too)
and not counted.

Run it without TRITON_INTERPRET (it compiles real kernels). Not part of the test suite;
its numbers are quoted in gpu_check.sh's header.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-estimate-"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H200_SMS = 132
TARGET = GPUTarget("cuda", 90, 32)


class _FakeSm90Driver:
    """Just enough of a Triton driver for the JIT to bind and compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("meta")


COMPILES: dict[str, list[tuple[str, float]]] = defaultdict(list)
ERRORS: dict[str, list[str]] = defaultdict(list)
_STEP = ["?"]
_SEEN: set = set()
_orig_run = JITFunction.run


def _counting_run(self, *args, grid, warmup, **kwargs):
    t0 = time.perf_counter()
    try:
        kernel = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is reported
        ERRORS[_STEP[0]].append(f"{self.fn.__name__}: {str(exc).strip().splitlines()[-1][:200]}")
        return None
    dt = time.perf_counter() - t0
    key = (self.fn.__name__, kernel.hash if kernel is not None else None)
    if key not in _SEEN:
        _SEEN.add(key)
        COMPILES[_STEP[0]].append((self.fn.__name__, dt))
    return kernel


def _meta(shape, dtype, stride=None):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t if stride is None else t.as_strided(shape, stride)


def decode_grid():
    from bench import bench_decode as bd
    from kernels import decode_attention as da

    da._SM_COUNTS[0] = H200_SMS
    da.use_triton = lambda *t: True
    for dtype in bd.DTYPES:
        for batch in bd.BATCHES:
            for context in bd.CONTEXTS:
                per_seq = -(-context // bd.BLOCK_SIZE)
                q = _meta((batch, bd.NUM_HEADS, bd.HEAD_DIM), dtype)
                cache = _meta((batch * per_seq + 1, 2, bd.BLOCK_SIZE, bd.NUM_KV_HEADS,
                               bd.HEAD_DIM), dtype)
                table = _meta((batch, per_seq), torch.int32)
                lens = _meta((batch,), torch.int32)
                group = bd.NUM_HEADS // bd.NUM_KV_HEADS
                chunks = triton.cdiv(group, da._group_tile(group, 128)[0])
                splits = da.choose_num_splits(batch, bd.NUM_KV_HEADS * chunks,
                                              per_seq * bd.BLOCK_SIZE, torch.device("cuda", 0))
                da.launch_decode_attention(q, cache, table, lens, torch.empty_like(q),
                                           bd.HEAD_DIM ** -0.5, splits)


def prefill_grid():
    from bench import bench_prefill as bp
    from kernels import prefill_attention as pa

    for dtype in bp.DTYPES:
        for L in bp.PROMPT_LENS:
            batch = max(1, bp.TOKENS_PER_LAUNCH // L)
            per_seq = -(-L // bp.BLOCK_SIZE)
            q = _meta((batch * L, bp.NUM_HEADS, bp.HEAD_DIM), dtype)
            kv = _meta((batch * per_seq, 2, bp.BLOCK_SIZE, bp.NUM_KV_HEADS, bp.HEAD_DIM), dtype)
            table = _meta((batch, per_seq), torch.int32)
            lens = _meta((batch,), torch.int32)
            qsl = _meta((batch + 1,), torch.int32)
            pa._launch(q, kv, table, lens, qsl, torch.empty_like(q), bp.HEAD_DIM ** -0.5)


def arena_grid():
    from bench import bench_arena as ba
    from kernels import compact as cp

    cp.use_triton = lambda *t: True
    for num_blocks, moves in ba.compaction_cases(gpu=True):
        blocks = torch.empty((num_blocks, *ba.SPEC.block_shape), dtype=ba.SPEC.dtype,
                             device="meta")
        src = _meta((moves,), torch.int64)
        table = _meta(ba.TABLE_SHAPE, torch.int32)
        cp.compact_blocks(blocks, src, torch.empty_like(src), table)


def decode_gpu_tests():
    """tests/test_decode_attention.py::test_decode_cuda: its cases, splits None, 1 and 7,
    with the test's layouts (a layer view of a block-major buffer, head-major query)."""
    import importlib.util

    from kernels import decode_attention as da

    spec = importlib.util.spec_from_file_location(
        "tda", Path(__file__).resolve().parents[1] / "tests" / "test_decode_attention.py")
    tda = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tda)
    da._SM_COUNTS[0] = H200_SMS
    da.use_triton = lambda *t: True
    for head_dim, heads, kv_heads, bs, dtype, num_seqs, max_len in tda.GPU_CASES:
        width = -(-max_len // bs) + 1
        blocks = num_seqs * width + 3
        buf = _meta((blocks, 2, 2, bs, kv_heads, head_dim), dtype)
        cache = buf[:, 1]
        q = _meta((heads, num_seqs, head_dim), dtype).transpose(0, 1)
        table = _meta((num_seqs, width), torch.int32)
        lens = _meta((num_seqs,), torch.int32)
        group = heads // kv_heads
        chunks = triton.cdiv(group, da._group_tile(group, max(16, triton.next_power_of_2(
            head_dim)))[0])
        auto = da.choose_num_splits(num_seqs, kv_heads * chunks, width * bs,
                                    torch.device("cuda", 0))
        for splits in (auto, 1, 7):
            out = _meta((num_seqs, heads, head_dim), dtype)
            da.launch_decode_attention(q, cache, table, lens, out, head_dim ** -0.5, splits)


def main() -> int:
    driver.set_active(_FakeSm90Driver())
    JITFunction.run = _counting_run
    report = {}
    for step, fn in (("bench_arena", arena_grid), ("bench_decode", decode_grid),
                     ("bench_prefill", prefill_grid), ("decode_gpu_tests", decode_gpu_tests)):
        _STEP[0] = step
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        rows = COMPILES[step]
        per_kernel = defaultdict(list)
        for name, dt in rows:
            per_kernel[name].append(dt)
        report[step] = {"specialisations": len(rows), "wall_s": round(wall, 1),
                        "compile_errors": sorted(set(ERRORS[step])),
                        "per_kernel": {k: {"count": len(v), "seconds": round(sum(v), 1),
                                           "max_s": round(max(v), 1)}
                                       for k, v in per_kernel.items()}}
        print(f"{step:14s} {len(rows):3d} new specialisations, {wall:6.1f} s  "
              + ", ".join(f"{k} x{len(v)} ({sum(v):.1f} s)" for k, v in per_kernel.items()),
              flush=True)
        for err in sorted(set(ERRORS[step])):
            print(f"    COMPILE ERROR {err}", flush=True)
    import platform
    report["host"] = {"cpu": platform.processor() or platform.machine(),
                      "triton": triton.__version__, "torch": torch.__version__}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
