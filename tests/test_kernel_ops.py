"""The kernels as torch custom ops: registration, opcheck, torch.compile, CUDA graphs.
(The ahead-of-time sm_90 build of every kernel is in test_kernel_aot.py.)"""
import importlib
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import ops  # re-exports only
from kernels.reference import compact_blocks_ref, paged_decode_attention_ref, write_kv_ref


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
    for name in ("write_kv", "paged_decode_attention", "paged_prefill_attention",
                 "compact_blocks"):
        assert hasattr(torch.ops.kvarena, name), name
    schema = str(torch.ops.kvarena.paged_decode_attention.default._schema)
    assert "Tensor(a4!) out" in schema  # declared as mutated, so functionalisation sees it
    schema = str(torch.ops.kvarena.compact_blocks.default._schema)
    assert "Tensor(a0!) blocks" in schema and "Tensor(a3!)? block_tables" in schema


def test_ops_module_only_re_exports():
    for name in ("write_kv", "decode_attention", "prefill_attention", "compact"):
        mod = sys.modules[f"kernels.{name}"]
        op = next(v for k, v in vars(mod).items() if k.endswith("_op") and hasattr(v, "_init_fn"))
        assert getattr(ops, op._init_fn.__name__) is op


def test_no_import_cycle_inside_kernels():
    # Each module imports cleanly on its own in a fresh interpreter (a cycle through
    # kernels.ops used to make this order-dependent), and none imports kernels.ops.
    for name in ("_checks", "_runtime", "reference", "write_kv", "decode_attention",
                 "prefill_attention", "compact", "ops"):
        code = f"import importlib; importlib.import_module('kernels.{name}')"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    for name in ("write_kv", "decode_attention", "prefill_attention", "compact"):
        src = importlib.util.find_spec(f"kernels.{name}").origin
        assert "import ops" not in open(src).read() and "from .ops" not in open(src).read()


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


def compact_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(16, 2, 4, 8, generator=g)
    table = torch.randint(-1, 16, (3, 6), generator=g, dtype=torch.int32)
    return blocks, torch.tensor([15, 12, 9]), torch.tensor([0, 3, 5]), table


def test_opcheck_compact_blocks():
    blocks, src, dst, table = compact_inputs()
    torch.library.opcheck(torch.ops.kvarena.compact_blocks.default, (blocks, src, dst, table))
    torch.library.opcheck(torch.ops.kvarena.compact_blocks.default, (blocks, src, dst, None))


def test_torch_compile_fullgraph_compact_blocks():
    blocks, src, dst, table = compact_inputs(seed=1)
    want_b, want_t = blocks.clone(), table.clone()
    compact_blocks_ref(want_b, src, dst, want_t)

    def step(blocks, src, dst, table):
        kernels.compact_blocks(blocks, src, dst, table)
        return table.sum()

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(blocks, src, dst, table)
    assert torch.equal(blocks, want_b) and torch.equal(table, want_t)
    assert int(got) == int(want_t.sum())


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
