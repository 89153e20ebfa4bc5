"""Compile, for an H100/H200 (sm_90) and without a GPU, every kernel specialisation that the
GPU tests and the benchmarks launch; fail on a compile error or a register spill.

How: a stand-in for Triton's active driver reports an sm_90 target, loads nothing and
launches nothing. The public kernel functions are then called exactly as the GPU tests
and benchmarks call them (their own case grids and input builders, imported from
``tests/`` and ``bench/``), with ``use_triton`` forced on and the tensors on the ``meta``
device (no memory, same shapes, strides and storage offsets). So the JIT's own binder
decides every specialisation (dtypes, constexprs, 16-divisibility of pointers and ints),
its cache compiles each distinct one once, and ``ptxas`` (bundled with the triton wheel)
builds the cubin. Each cubin's resource usage comes from the bundled ``cuobjdump``: a
non-zero stack frame or local memory means spilled registers.

Usage: ``python scripts/aot_compile.py [--json FILE] [--only write_kv,decode,...]``.
Prints one JSON line per compiled specialisation and a summary; exit status 1 when any
case failed to compile or any kernel spills. Needs TRITON_INTERPRET unset (or 0).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 is the default
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
import triton.compiler  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

H200_SMS = 132
H200_MAX_SHARED = 232448  # bytes per block (227 KiB), sm_90's opt-in maximum
TARGET = GPUTarget("cuda", 90, 32)
META = torch.device("meta")


# --- the stand-in driver ---------------------------------------------------------------

def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame, local and shared memory of a cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        tail = text.split(f"{key}:", 1)
        usage[key.lower()] = int(tail[1].split()[0].rstrip(",")) if len(tail) > 1 else 0
    return usage


class _Utils:
    def __init__(self, record):
        self._record = record

    def load_binary(self, name, cubin, shared, device):
        usage = resource_usage(cubin)
        self._record(name, usage, shared)
        return object(), object(), usage["reg"], usage["stack"], 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": H200_MAX_SHARED, "multiprocessor_count": H200_SMS,
                "max_num_regs": 65536, "warpSize": 32}


class FakeSm90Driver:
    """Enough of Triton's driver interface to compile and 'launch' for sm_90: the launch
    itself is a no-op and loading a binary only reads its resource usage."""

    def __init__(self, record):
        self.utils = _Utils(record)
        self.launcher_cls = lambda src, metadata: (lambda *args, **kwargs: None)

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return META

    def is_active(self):
        return True


# --- recording -----------------------------------------------------------------------

class Recorder:
    def __init__(self, echo=True):
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.case = ""
        self.echo = echo
        self._pending: dict | None = None

    def compiled(self, src, seconds, wgmma):
        consts = {}
        names = list(src.fn.arg_names)
        for path, value in src.constants.items():
            idx = path[0] if isinstance(path, tuple) else path
            if isinstance(idx, int):
                idx = names[idx]
            consts[str(idx)] = value if isinstance(value, (int, float, str, bool)) else str(value)
        self._pending = dict(kernel=src.fn.__name__, case=self.case, compile_s=round(seconds, 2),
                             signature={k: v for k, v in src.signature.items()
                                        if v != "constexpr"},
                             constexprs=consts, wgmma=wgmma)

    def loaded(self, name, usage, shared):
        row = self._pending or dict(kernel=name, case=self.case, compile_s=0.0)
        self._pending = None
        row.update(usage, shared_bytes=shared, spills=usage["stack"] > 0 or usage["local"] > 0)
        self.rows.append(row)
        if self.echo:
            short = {k: row[k] for k in ("kernel", "case", "compile_s", "reg", "stack", "spills")}
            print(json.dumps(short), flush=True)


_OPS = [("write_kv", "write_kv_op"), ("decode_attention", "paged_decode_attention_op"),
        ("prefill_attention", "paged_prefill_attention_op"), ("compact", "compact_blocks_op")]


@contextlib.contextmanager
def sm90_compiler(rec: Recorder):
    """Install the stand-in driver and time every compile; restore both afterwards."""
    from kernels import _runtime, decode_attention

    real_compile = triton.compiler.compile

    def timed_compile(src, *args, **kwargs):
        t0 = time.perf_counter()
        k = real_compile(src, *args, **kwargs)
        rec.compiled(src, time.perf_counter() - t0, k.asm.get("ptx", "").count("wgmma.mma_async"))
        return k

    real_use_triton, real_splits = _runtime.use_triton, decode_attention.choose_num_splits
    # Meta tensors would dispatch a custom op to its fake (which does nothing): call the
    # ops' Python bodies directly instead, as the real dispatch does for CUDA tensors.
    ops = [(sys.modules[f"kernels.{mod}"], name) for mod, name in _OPS]
    real_ops = [getattr(m, name) for m, name in ops]
    for (m, name), op in zip(ops, real_ops):
        setattr(m, name, op._init_fn)
    triton.compiler.compile = timed_compile
    driver.set_active(FakeSm90Driver(rec.loaded))
    _runtime.use_triton = lambda *tensors: True
    # Split counts as an H200 would choose them (they pick constexprs and the merge kernel).
    decode_attention._SM_COUNTS[0] = H200_SMS
    decode_attention.choose_num_splits = (
        lambda n, p, ctx, device: real_splits(n, p, ctx, torch.device("cuda", 0)))
    try:
        yield
    finally:
        triton.compiler.compile = real_compile
        for (m, name), op in zip(ops, real_ops):
            setattr(m, name, op)
        _runtime.use_triton = real_use_triton
        decode_attention.choose_num_splits = real_splits
        decode_attention._SM_COUNTS.pop(0, None)


@contextlib.contextmanager
def meta_random():
    """The tests' input builders draw random CPU tensors then move them: make those draws
    meta tensors (their values never matter to a compile), so full GPU sizes cost nothing."""
    real = torch.randn

    def fake(*size, generator=None, dtype=None, device=None, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        return torch.empty(size, dtype=dtype or torch.float32, device=META)

    torch.randn = fake
    try:
        yield
    finally:
        torch.randn = real


# --- what the GPU tests and the benchmarks launch -----------------------------------------

def cases_write_kv():
    import test_write_kv as t

    for head_dim, heads, bs, cache_dtype, key_dtype, layers, num_tokens in t.GPU_CASES:
        def run(head_dim=head_dim, heads=heads, bs=bs, cache_dtype=cache_dtype,
                key_dtype=key_dtype, layers=layers, num_tokens=num_tokens):
            import kernels
            num_blocks = 2 * num_tokens // bs + 8
            _, cache = t.make_cache(num_blocks, bs, heads, head_dim, cache_dtype,
                                    num_layers=layers, layer=layers // 2, device=META)
            key, value = t.make_tokens(num_tokens, heads, head_dim, key_dtype, strided=True,
                                       device=META)
            slots = t.random_slots(num_tokens, num_blocks * bs, skip_every=7, device=META)
            kernels.write_kv(cache, key, value, slots)
        yield f"test_write_kv_cuda d{head_dim} h{heads} bs{bs} {_n(cache_dtype)}<-{_n(key_dtype)}", run


def cases_decode():
    import test_decode_attention as t

    for head_dim, heads, kv_heads, bs, dtype, num_seqs, max_len in t.GPU_CASES:
        def run(head_dim=head_dim, heads=heads, kv_heads=kv_heads, bs=bs, dtype=dtype,
                num_seqs=num_seqs, max_len=max_len):
            import kernels
            g = torch.Generator().manual_seed(head_dim + num_seqs)  # as the test draws them
            lens = torch.randint(1, max_len + 1, (num_seqs,), generator=g).tolist()
            lens[0] = max_len
            if num_seqs > 2:
                lens[1], lens[2] = 1, bs * 3
            case = t.make_case(num_seqs, heads, kv_heads, head_dim, bs, dtype, lens,
                               num_layers=2, device=META)
            for splits in (None, 1, 7):
                kernels.paged_decode_attention(**t.kernel_args(case), num_splits=splits)
        yield (f"test_decode_cuda d{head_dim} {heads}/{kv_heads} bs{bs} {_n(dtype)} "
               f"x{num_seqs} len{max_len}"), run


def cases_decode_step_graph():
    import test_kernel_ops as t

    for dtype in (torch.float16, torch.bfloat16):
        def run(dtype=dtype):
            import kernels
            s = t.make_step_inputs(META, dtype, num_seqs=4, heads=32, kv_heads=8, head_dim=128)
            kernels.write_kv(s["kv_cache"], s["key"], s["value"], s["slots"])
            kernels.paged_decode_attention(s["query"], s["kv_cache"], s["block_tables"],
                                           s["seq_lens"], out=torch.empty_like(s["query"]))
        yield f"test_cuda_graph_decode_step {_n(dtype)}", run


def cases_prefill():
    import test_prefill_attention as t

    for dtype, head_dim, heads, kv_heads, bs in t.GPU_CASES:
        def run(dtype=dtype, head_dim=head_dim, heads=heads, kv_heads=kv_heads, bs=bs):
            import kernels
            args = t.make_case(t.gpu_specs(bs), heads, kv_heads, head_dim, bs, dtype,
                               num_layers=2, seed=head_dim, device=META)
            kernels.paged_prefill_attention(*args)
        yield f"test_gpu_full_size d{head_dim} {heads}/{kv_heads} bs{bs} {_n(dtype)}", run

    def graph():
        import kernels
        cover = [(300, 0), (500, 0), (90, 0), (64, 0)]
        _, kv, table, _, _ = t.make_case(cover, 8, 2, 128, 16, torch.float16, seed=1,
                                         device=META)
        query = torch.empty(485, 8, 128, dtype=torch.float16, device=META)
        lens = torch.empty(4, dtype=torch.int32, device=META)
        qsl = torch.empty(5, dtype=torch.int32, device=META)
        kernels.paged_prefill_attention(query, kv, table, lens, qsl, out=torch.empty_like(query))
    yield "test_gpu_cuda_graph_capture_and_replay", graph


def cases_compact():
    from arena import KVSpec

    def direct():  # tests/test_arena_gpu.py::test_compact_kernel_matches_reference_on_gpu
        import kernels
        blocks = torch.empty(64, 4, 2, 16, 8, 128, dtype=torch.float16, device=META)
        perm = torch.empty(64, dtype=torch.int64, device=META)
        table = torch.empty(8, 32, dtype=torch.int32, device=META)
        kernels.compact_blocks(blocks, perm[:20], perm[20:40], table)
    yield "test_compact_kernel_matches_reference_on_gpu", direct

    # PagedArena.shrink: the whole block-major buffer, int64 moves from numpy, the arena's
    # device table (its own width). GPU tests' specs: test_arena_gpu, test_scheduler_kv.
    for spec in (KVSpec(num_layers=4, num_kv_heads=8, head_dim=128, block_size=16,
                        dtype=torch.float16),
                 KVSpec(2, 8, 128, block_size=16, dtype=torch.float16),
                 KVSpec(2, 2, 16, block_size=4, dtype=torch.float16)):
        def shrink(spec=spec):
            from arena import PagedArena
            import kernels
            arena = PagedArena(spec, 4 << 20, "cpu", max_seqs=16)
            try:
                n = arena.capacity_blocks
                blocks = torch.empty(arena.blocks.shape, dtype=arena.blocks.dtype, device=META)
                table = torch.empty(arena.tables.device_table.shape, dtype=torch.int32,
                                    device=META)
                moves = torch.empty(min(8, n // 2), dtype=torch.int64, device=META)
                kernels.compact_blocks(blocks, moves, moves.clone(), table)
            finally:
                arena.close()
        yield f"PagedArena.shrink {spec.block_bytes} B blocks", shrink

    def bench():  # bench/bench_arena.py::compaction_bandwidth
        import kernels
        from bench.bench_arena import SPEC, TABLE_SHAPE, compaction_cases
        # The benchmark's own grid: src/dst are slices of one randperm, so an odd move
        # count gives dst an 8-byte offset (a different pointer specialisation).
        for n, m in compaction_cases(gpu=True):
            blocks = torch.empty((n, *SPEC.block_shape), dtype=SPEC.dtype, device=META)
            perm = torch.empty(n, dtype=torch.int64, device=META)
            table = torch.empty(TABLE_SHAPE, dtype=torch.int32, device=META)
            kernels.compact_blocks(blocks, perm[:m], perm[m:2 * m], table)
    yield "bench_arena compaction", bench


def cases_bench_decode():
    from bench import bench_decode as b

    for dtype in b.DTYPES:
        def run(dtype=dtype):
            import kernels
            for batch in b.BATCHES:
                for context in b.CONTEXTS:
                    per_seq = math.ceil(context / b.BLOCK_SIZE)  # as bench_decode.make_inputs
                    cache = torch.empty(batch * per_seq + 1, 2, b.BLOCK_SIZE, b.NUM_KV_HEADS,
                                        b.HEAD_DIM, dtype=dtype, device=META)
                    query = torch.empty(batch, b.NUM_HEADS, b.HEAD_DIM, dtype=dtype, device=META)
                    table = torch.empty(batch, per_seq, dtype=torch.int32, device=META)
                    lens = torch.empty(batch, dtype=torch.int32, device=META)
                    kernels.paged_decode_attention(query, cache, table, lens,
                                                   out=torch.empty_like(query))
        yield f"bench_decode grid {_n(dtype)}", run


def cases_bench_prefill():
    from bench import bench_prefill as b

    for dtype in b.DTYPES:
        def run(dtype=dtype):
            import kernels
            for prompt_len in b.PROMPT_LENS:  # shapes of bench_prefill.make_workload
                batch = max(1, b.TOKENS_PER_LAUNCH // prompt_len)
                per_seq = -(-prompt_len // b.BLOCK_SIZE)
                query = torch.empty(batch * prompt_len, b.NUM_HEADS, b.HEAD_DIM, dtype=dtype,
                                    device=META)
                kv = torch.empty(batch * per_seq, 2, b.BLOCK_SIZE, b.NUM_KV_HEADS, b.HEAD_DIM,
                                 dtype=dtype, device=META)
                table = torch.empty(batch, per_seq, dtype=torch.int32, device=META)
                lens = torch.empty(batch, dtype=torch.int32, device=META)
                qsl = torch.empty(batch + 1, dtype=torch.int32, device=META)
                kernels.paged_prefill_attention(query, kv, table, lens, qsl,
                                                out=torch.empty_like(query))
        yield f"bench_prefill grid {_n(dtype)}", run


def cases_strided_indices():
    """Index tensors as engines pass them (columns of a packed int tensor, strided views):
    not launched by the GPU tests at full size, but a different specialisation (stride != 1)."""
    def run():
        import kernels
        cache = torch.empty(64, 2, 16, 8, 128, dtype=torch.float16, device=META)
        meta64 = torch.empty(8, 3, dtype=torch.int64, device=META)
        meta32 = torch.empty(9, 3, dtype=torch.int32, device=META)
        kv = torch.empty(8, 8, 128, dtype=torch.float16, device=META)
        kernels.write_kv(cache, kv, kv, meta64[:, 0])
        table = torch.empty(8, 12, dtype=torch.int32, device=META)[:, ::2]
        q = torch.empty(8, 32, 128, dtype=torch.float16, device=META)
        kernels.paged_decode_attention(q, cache, table, meta32[:8, 1])
        kernels.paged_prefill_attention(q, cache, table, meta32[:8, 1], meta32[:, 2])
        blocks = torch.empty(64, 2, 16, 8, 128, dtype=torch.float16, device=META)
        kernels.compact_blocks(blocks, meta64[:, 0], meta64[:, 1], table)
    yield "strided index tensors (fp16, d128, GQA 4)", run


GROUPS = {"write_kv": [cases_write_kv], "decode": [cases_decode, cases_decode_step_graph,
                                                   cases_bench_decode],
          "prefill": [cases_prefill, cases_bench_prefill], "compact": [cases_compact],
          "strided": [cases_strided_indices]}


def _n(dtype) -> str:
    return str(dtype).replace("torch.", "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write every compiled specialisation's record here")
    p.add_argument("--only", default=",".join(GROUPS), help="comma-separated: " + ",".join(GROUPS))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    rec = Recorder(echo=not args.quiet)
    t0 = time.perf_counter()
    with sm90_compiler(rec), meta_random():
        for group in args.only.split(","):
            for make_cases in GROUPS[group]:
                for label, run in make_cases():
                    rec.case = label
                    try:
                        run()
                    except Exception as e:  # noqa: BLE001 - every failure is reported
                        rec.failures.append(dict(case=label, error=f"{type(e).__name__}: {e}"[:4000]))
                        print(f"FAILED {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    total = time.perf_counter() - t0
    per_kernel: dict[str, list] = {}
    for r in rec.rows:
        n, s = per_kernel.get(r["kernel"], (0, 0.0))
        per_kernel[r["kernel"]] = (n + 1, s + r["compile_s"])
    spilled = [r for r in rec.rows if r["spills"]]
    summary = dict(triton=triton.__version__, torch=torch.__version__, target="sm_90",
                   specialisations=len(rec.rows), wall_s=round(total, 1),
                   per_kernel={k: dict(specialisations=n, compile_s=round(s, 1))
                               for k, (n, s) in sorted(per_kernel.items())},
                   failures=rec.failures, spilled=spilled)
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(summary, rows=rec.rows), indent=1) + "\n")
    return 1 if rec.failures or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
