"""The kernels as torch custom ops: registration, opcheck, torch.compile, CUDA graphs; and
an ahead-of-time sm_90 build of the kernels that needs no GPU (catches GPU-only compile
errors and register spills on a CPU machine)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import ops
from kernels.reference import paged_decode_attention_ref, write_kv_ref


def make_step_inputs(device="cpu", dtype=torch.float16, num_seqs=3, heads=4, kv_heads=2,
                     head_dim=64, block_size=16, seed=0):
    """A decode step's inputs: per-layer cache view, shuffled block tables, the new token's
    K/V and its slot (the last position of each sequence)."""
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 5 * block_size, (num_seqs,), generator=g)]
    lens[0] = 5 * block_size  # an exact multiple of the block size
    width = 5
    num_blocks = num_seqs * width + 2
    buf = torch.randn(num_blocks, 2, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    table = torch.randperm(num_blocks, generator=g)[:num_seqs * width].view(num_seqs, width)
    table = table.to(torch.int32)
    slots = torch.tensor([int(table[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                          for i, n in enumerate(lens)], dtype=torch.int64)
    t = dict(buffer=buf, query=torch.randn(num_seqs, heads, head_dim, generator=g).to(dtype),
             key=torch.randn(num_seqs, kv_heads, head_dim, generator=g).to(dtype),
             value=torch.randn(num_seqs, kv_heads, head_dim, generator=g).to(dtype),
             block_tables=table, seq_lens=torch.tensor(lens, dtype=torch.int32), slots=slots)
    t = {k: v.to(device) for k, v in t.items()}
    t["kv_cache"] = t["buffer"][:, 1]
    return t


def reference_step(t, scale=None):
    cache = t["kv_cache"].clone()
    write_kv_ref(cache, t["key"], t["value"], t["slots"])
    out = paged_decode_attention_ref(t["query"], cache, t["block_tables"], t["seq_lens"],
                                     scale=scale)
    return out, cache


def test_ops_are_registered_in_the_kvarena_namespace():
    assert hasattr(torch.ops.kvarena, "write_kv")
    assert hasattr(torch.ops.kvarena, "paged_decode_attention")
    schema = str(torch.ops.kvarena.paged_decode_attention.default._schema)
    assert "Tensor(a4!) out" in schema  # declared as mutated, so functionalisation sees it


def test_opcheck_write_kv():
    t = make_step_inputs()
    torch.library.opcheck(torch.ops.kvarena.write_kv.default,
                          (t["kv_cache"], t["key"], t["value"], t["slots"]))


def test_opcheck_paged_decode_attention():
    t = make_step_inputs(dtype=torch.float32)
    out = torch.empty_like(t["query"])
    torch.library.opcheck(torch.ops.kvarena.paged_decode_attention.default,
                          (t["query"], t["kv_cache"], t["block_tables"], t["seq_lens"], out,
                           0.2, 3))


def _decode_step(query, key, value, slots, kv_cache, block_tables, seq_lens):
    kernels.write_kv(kv_cache, key, value, slots)
    return kernels.paged_decode_attention(query, kv_cache, block_tables, seq_lens) * 2


def test_torch_compile_fullgraph_through_the_public_functions():
    # aot_eager exercises dynamo, the fake kernels and functionalisation of the mutated
    # arguments without inductor's C++ build (which works too, but takes ~20 s here).
    t = make_step_inputs()
    want_out, want_cache = reference_step(t)
    other_layer = t["buffer"][:, 0].clone()
    step = torch.compile(_decode_step, fullgraph=True, backend="aot_eager")
    got = step(t["query"], t["key"], t["value"], t["slots"], t["kv_cache"], t["block_tables"],
               t["seq_lens"])
    torch.testing.assert_close(got, 2 * want_out, atol=4e-3, rtol=2e-3)
    assert torch.equal(t["kv_cache"], want_cache)
    assert torch.equal(t["buffer"][:, 0], other_layer)


def test_torch_compile_fullgraph_calling_the_ops():
    t = make_step_inputs(dtype=torch.float32)

    def step(query, key, value, slots, kv_cache, block_tables, seq_lens):
        torch.ops.kvarena.write_kv(kv_cache, key, value, slots)
        out = torch.empty_like(query)
        torch.ops.kvarena.paged_decode_attention(query, kv_cache, block_tables, seq_lens, out,
                                                 0.125, 2)
        return out + 1

    want_out, want_cache = reference_step(t, scale=0.125)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(
        t["query"], t["key"], t["value"], t["slots"], t["kv_cache"], t["block_tables"],
        t["seq_lens"])
    torch.testing.assert_close(got, want_out + 1, atol=1e-5, rtol=1e-5)
    assert torch.equal(t["kv_cache"], want_cache)


def test_prepare_out():
    like = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    fresh = ops.prepare_out(None, like)
    assert fresh.shape == like.shape and fresh.dtype == like.dtype and fresh.is_contiguous()
    given = torch.zeros(3, 2, 4, dtype=torch.bfloat16).transpose(0, 1)
    assert ops.prepare_out(given, like) is given
    with pytest.raises(ValueError, match="result"):
        ops.prepare_out(torch.zeros(2, 3, 5, dtype=torch.bfloat16), like, name="result")
    with pytest.raises(TypeError, match="out"):
        ops.prepare_out(torch.zeros(2, 3, 4), like)
    with pytest.raises(ValueError, match="out"):
        ops.prepare_out(torch.zeros(2, 4, 3, dtype=torch.bfloat16).transpose(1, 2), like)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_decode_step_matches_eager(dtype):
    """Capture write_kv + decode once, replay with new inputs copied into the static ones."""
    static = make_step_inputs("cuda", dtype, num_seqs=4, heads=32, kv_heads=8, head_dim=128)
    out = torch.empty_like(static["query"])

    def step(t, out):
        kernels.write_kv(t["kv_cache"], t["key"], t["value"], t["slots"])
        kernels.paged_decode_attention(t["query"], t["kv_cache"], t["block_tables"],
                                       t["seq_lens"], out=out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static, out)  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    # The eager twin starts from the cache as the warm-up left it (capture writes nothing).
    eager = {k: v.clone() for k, v in static.items()}
    eager["kv_cache"] = eager["buffer"][:, 1]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static, out)

    for seed in (1, 2):
        new = make_step_inputs("cuda", dtype, num_seqs=4, heads=32, kv_heads=8, head_dim=128,
                               seed=seed)
        for k in ("query", "key", "value", "block_tables", "seq_lens", "slots"):
            static[k].copy_(new[k])
            eager[k].copy_(new[k])
        graph.replay()
        want = torch.empty_like(out)
        step(eager, want)
        torch.cuda.synchronize()
        assert torch.equal(out, want)
        assert torch.equal(static["buffer"], eager["buffer"])


# --- sm_90 build without a GPU ------------------------------------------------------------
# Run as a script (``python tests/test_kernel_ops.py``) with TRITON_INTERPRET unset, this file
# captures the kernels' real launch arguments (the launch functions are called with
# use_triton forced on and the JIT's run() replaced), compiles each variant for sm_90 with
# triton's bundled ptxas, and prints one JSON line per variant with its registers and spill
# stack. It relies on triton's compiler internals (pinned to < 3.10), so the test skips if
# the harness itself cannot start.

_AOT_DECODE_CASES = [  # heads, kv_heads, head_dim, block_size, query dtype, cache dtype, splits
    (32, 8, 128, 16, "float16", "float16", 1),
    (32, 8, 128, 16, "bfloat16", "bfloat16", 4),
    (32, 32, 128, 16, "float16", "float16", 1),
    (80, 1, 128, 16, "float16", "float16", 2),
    (16, 4, 256, 16, "bfloat16", "bfloat16", 1),
    (8, 2, 192, 128, "bfloat16", "bfloat16", 64),
    (32, 8, 80, 16, "float16", "float16", 1),
    (16, 4, 256, 16, "float32", "float32", 1),
    (32, 8, 128, 16, "float32", "float16", 1),
]


def _aot_main():  # pragma: no cover - runs in a subprocess
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    dm = importlib.import_module("kernels.decode_attention")
    wm = importlib.import_module("kernels.write_kv")
    target = GPUTarget("cuda", 90, 32)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
           torch.int32: "*i32", torch.int64: "*i64"}

    def build(fn, args, kwargs, label):
        kw = dict(kwargs)
        opts = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
        sig, consts, attrs = {}, {}, {}
        # Specialise like the JIT launcher: ints equal to 1 become constants, multiples of
        # 16 (and every tensor pointer) carry the divisibility hint.
        for i, name in enumerate(fn.arg_names):
            if i >= len(args):
                consts[name], sig[name] = kw[name], "constexpr"
                continue
            a = args[i]
            if isinstance(a, torch.Tensor):
                sig[name], attrs[(i,)] = ptr[a.dtype], [["tt.divisibility", 16]]
            elif isinstance(a, float):
                sig[name] = "fp32"
            elif a == 1:
                consts[name], sig[name] = 1, "constexpr"
            else:
                sig[name] = "i32"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        options = make_backend(target).parse_options(opts).__dict__
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=options)
        path = os.path.join(os.environ.get("AOT_TMP", "/tmp"), f"kvarena_{os.getpid()}.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True,
                             text=True).stdout
        os.unlink(path)
        m = re.search(r"REG:(\d+) STACK:(\d+)", res)
        print(json.dumps(dict(label=label, regs=int(m.group(1)), stack=int(m.group(2)))), flush=True)

    def intercept(kernel, label):
        kernel.run = lambda *a, grid=None, warmup=False, **kw: build(kernel, a, kw, label)

    dm.use_triton = wm.use_triton = lambda *t: True
    for heads, kv_heads, dim, bs, qd, cd, splits in _AOT_DECODE_CASES:
        label = f"decode {heads}/{kv_heads} d{dim} bs{bs} {qd}/{cd} splits={splits}"
        intercept(dm._decode_split_kernel, label)
        intercept(dm._merge_splits_kernel, label + " merge")
        q = torch.zeros(2, heads, dim, dtype=getattr(torch, qd))
        cache = torch.zeros(8, 2, bs, kv_heads, dim, dtype=getattr(torch, cd))
        dm.launch_decode_attention(q, cache, torch.zeros(2, 4, dtype=torch.int32),
                                   torch.ones(2, dtype=torch.int32), torch.empty_like(q),
                                   0.1, splits)
    intercept(wm._write_kv_kernel, "write_kv bf16 <- fp32")
    wm.launch_write_kv(torch.zeros(8, 2, 16, 8, 128, dtype=torch.bfloat16),
                       torch.zeros(3, 8, 128), torch.zeros(3, 8, 128),
                       torch.zeros(3, dtype=torch.int64))


def test_kernels_build_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(AOT_TMP=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and ("ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr
                            or "No such file" in proc.stderr):
        pytest.skip(f"no sm_90 toolchain here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    merges = sum(c[-1] > 1 for c in _AOT_DECODE_CASES)
    assert len(rows) == len(_AOT_DECODE_CASES) + merges + 1, proc.stdout
    spilled = [r for r in rows if r["stack"] > 0]
    assert not spilled, spilled


if __name__ == "__main__":
    _aot_main()
