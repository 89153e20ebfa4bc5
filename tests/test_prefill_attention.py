"""paged_prefill_attention against the torch reference (CPU: Triton interpreter; GPU: compiled).

Shapes stay small on CPU: the interpreter costs milliseconds per program and KV tile.
Full-size shapes and CUDA-graph capture are in the ``gpu``-marked tests at the end.
"""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import _runtime
from kernels import prefill_attention as pa
from kernels import reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Comparison with the reference (float32 maths, rounded once to the output dtype). fp16: the
# kernel rounds softmax weights to fp16 before the PV product; bf16: the interpreter
# truncates fp32 -> bf16, so allow ~1.5 ulp (2**-7 relative per ulp at most) plus slack.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2 ** -6, rtol=2 ** -6),
}


def make_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, *, seed=0,
              num_layers=None, layer=1, pad=-1, extra_cols=1, device=DEVICE):
    """Random inputs for sequences ``specs = [(seq_len, q_len), ...]``.

    Block ids are a random permutation (tables are non-contiguous and unordered); table
    columns past a sequence's blocks hold ``pad``. With ``num_layers`` the cache is the
    strided view ``buffer[:, layer]`` of a block-major ``[num_blocks, num_layers, 2, ...]``
    buffer, as the arena hands it out.
    """
    g = torch.Generator().manual_seed(seed)
    nblk = [math.ceil(s / block_size) for s, _ in specs]
    num_blocks = sum(nblk) + 3  # a few blocks no sequence uses
    width = max(nblk + [1]) + extra_cols
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(specs), width), pad, dtype=torch.int32)
    used = 0
    for i, n in enumerate(nblk):
        table[i, :n] = ids[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, 2, block_size, num_kv_heads, head_dim)
    if num_layers is None:
        kv = torch.randn(shape, generator=g).to(dtype)
    else:
        buf = torch.randn((num_blocks, num_layers) + shape[1:], generator=g).to(dtype)
        kv = buf[:, layer]
    seq_lens = torch.tensor([s for s, _ in specs], dtype=torch.int32)
    qsl = torch.zeros(len(specs) + 1, dtype=torch.int32)
    q_lens = torch.tensor([q for _, q in specs], dtype=torch.int64)
    qsl[1:] = torch.cumsum(q_lens, 0).to(torch.int32)
    query = torch.randn((int(qsl[-1]), num_heads, head_dim), generator=g).to(dtype)
    to = lambda t: t.to(device)  # noqa: E731
    if num_layers is not None and device != "cpu":
        kv = buf.to(device)[:, layer]
    else:
        kv = to(kv)
    return to(query), kv, to(table), to(seq_lens), to(qsl)


def assert_matches_reference(query, kv, table, seq_lens, qsl, out, scale=None):
    ref = reference.paged_prefill_attention_ref(query, kv, table, seq_lens, qsl, scale=scale)
    assert out.shape == query.shape and out.dtype == query.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[query.dtype])


# Mixed batches, every one in a single launch: a whole prompt, a chunk starting mid-block,
# decode rows (q = 1), a sequence with no queries, a context of length 1, and contexts that
# are exact multiples of the block size.
def mixed_specs(bs):
    return [
        (3 * bs, 3 * bs),      # whole prompt, exact multiple of the block size
        (2 * bs + 5, bs - 2),  # chunked prefill: the chunk starts mid-block
        (bs + 3, 1),           # decode row
        (2 * bs, 0),           # no queries this step
        (1, 1),                # context of one token
        (4 * bs, bs),          # a chunk that starts at a block boundary
    ]


# (dtype, head_dim, num_heads, num_kv_heads, block_size, layered): a sampled grid covering
# every dtype, head_dim {32, 80, 128, 192, 256}, MHA/GQA/MQA, block sizes {8, 16, 32, 128}.
CASES = [
    (torch.float16, 32, 4, 4, 16, False),
    (torch.bfloat16, 80, 8, 2, 8, True),
    (torch.float32, 128, 4, 1, 32, False),
    (torch.float16, 128, 6, 2, 16, True),    # GQA group of 3: padded head rows
    (torch.bfloat16, 32, 8, 1, 32, False),   # MQA, group 8 > heads folded: split groups
    (torch.float32, 80, 2, 2, 8, True),
    (torch.float16, 80, 4, 1, 8, False),
    (torch.bfloat16, 128, 4, 2, 16, False),
    (torch.float16, 192, 4, 2, 16, False),   # the one head_dim 192 case
]


@pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv_heads,block_size,layered", CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_mixed_batch_matches_reference(dtype, head_dim, num_heads, num_kv_heads, block_size,
                                       layered):
    args = make_case(mixed_specs(block_size), num_heads, num_kv_heads, head_dim, block_size,
                     dtype, num_layers=3 if layered else None, seed=head_dim + block_size)
    out = kernels.paged_prefill_attention(*args)
    assert_matches_reference(*args, out)


def test_head_dim_256_block_128_small():
    specs = [(130, 130), (200, 9), (129, 1)]
    args = make_case(specs, 2, 2, 256, 128, torch.bfloat16, seed=7)
    out = kernels.paged_prefill_attention(*args)
    assert_matches_reference(*args, out)


# Tile shapes other than the default: KV tiles smaller than a block (one table entry per
# tile), equal to it, and spanning several blocks; one query per tile row group; folded
# head groups split over programs (heads < group).
TILES = [
    (16, 16, 1, 32),   # block_m, block_n, heads, block_size
    (32, 16, 2, 16),
    (64, 64, 4, 8),
    (16, 32, 4, 16),   # one query row per tile... four heads per query
    (32, 64, 2, 128),
]


@pytest.mark.parametrize("block_m,block_n,heads,block_size", TILES)
def test_tile_configs(block_m, block_n, heads, block_size):
    specs = [(75, 75), (70, 19), (40, 1), (block_size, block_size), (1, 1)]
    args = make_case(specs, 8, 2, 64, block_size, torch.float16, seed=block_m * block_n)
    out = torch.empty_like(args[0])
    cfg = pa.TileConfig(block_m, block_n, heads, num_warps=4, num_stages=1)
    pa._launch(*args, out, 64 ** -0.5, config=cfg)
    assert_matches_reference(*args, out)


@pytest.mark.parametrize("block_n", [16, 32])
def test_every_chunk_alignment(block_n):
    # Chunks starting at every offset modulo the KV tile, so the last unmasked tile and the
    # first masked one meet at every position relative to the diagonal.
    specs = [(ctx + q, q) for ctx in range(block_n + 1) for q in (3, 20) if (ctx + q) % 3 != 1]
    args = make_case(specs, 2, 1, 32, 8, torch.float32, seed=block_n)
    out = torch.empty_like(args[0])
    cfg = pa.TileConfig(16, block_n, 1, num_warps=4, num_stages=1)
    pa._launch(*args, out, 32 ** -0.5, config=cfg)
    assert_matches_reference(*args, out)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_batches(seed):
    g = torch.Generator().manual_seed(100 + seed)
    bs = [8, 16, 32][seed % 3]
    specs = []
    for _ in range(3):
        seq_len = int(torch.randint(1, 160, (1,), generator=g))
        q_len = int(torch.randint(0, seq_len + 1, (1,), generator=g))
        specs.append((seq_len, q_len))
    args = make_case(specs, 4, 2, 64, bs, torch.float16, seed=seed)
    out = kernels.paged_prefill_attention(*args)
    assert_matches_reference(*args, out)


def test_scale_and_out_are_used():
    args = make_case([(40, 40), (33, 5)], 4, 2, 32, 16, torch.float32, seed=3)
    out = torch.full_like(args[0], float("nan"))
    got = kernels.paged_prefill_attention(*args, scale=0.3, out=out)
    assert got is out
    assert_matches_reference(*args, out, scale=0.3)
    default = kernels.paged_prefill_attention(*args)
    assert not torch.allclose(default, out)


def test_out_may_be_strided():
    args = make_case([(40, 40), (20, 3)], 4, 2, 32, 16, torch.float16, seed=4)
    big = torch.zeros(args[0].shape[0], 6, 32, dtype=torch.float16, device=DEVICE)
    out = big[:, 1:5]
    kernels.paged_prefill_attention(*args, out=out)
    assert_matches_reference(*args, out)
    assert (big[:, 0] == 0).all() and (big[:, 5] == 0).all()


def test_query_slice_of_fused_qkv():
    query, kv, table, seq_lens, qsl = make_case([(50, 50), (30, 4)], 4, 2, 32, 16,
                                                torch.float16, seed=5)
    qkv = torch.cat([query, torch.randn_like(query[:, :4])], dim=1)  # [T, 8, D]
    q_view = qkv[:, :4]
    assert not q_view.is_contiguous()
    out = kernels.paged_prefill_attention(q_view, kv, table, seq_lens, qsl)
    assert_matches_reference(query, kv, table, seq_lens, qsl, out)


def test_no_queries_at_all():
    args = make_case([(10, 0), (20, 0)], 4, 2, 32, 16, torch.float16, seed=6)
    out = kernels.paged_prefill_attention(*args)
    assert out.shape == (0, 4, 32)


def test_reference_fallback_path(monkeypatch):
    # On a CPU without the interpreter the op computes through the reference.
    monkeypatch.setattr(_runtime, "use_triton", lambda *t: False)
    args = make_case([(30, 30), (20, 2)], 4, 2, 32, 8, torch.float32, seed=8, device="cpu")
    out = kernels.paged_prefill_attention(*args)
    assert_matches_reference(*args, out)


# ------------------------------------------------------------------ bad input
def _good():
    return make_case([(40, 40), (33, 5)], 4, 2, 32, 16, torch.float16, seed=9, device="cpu")


def _set(i, value):
    def mutate(a):
        a[i] = value
    return mutate


def _edit(i, fn):
    def mutate(a):
        a[i] = fn(a[i])
    return mutate


def _edit_values(i, fn):
    def mutate(a):
        t = a[i].clone()
        fn(t)
        a[i] = t
    return mutate


META = torch.device("meta")
# (id, mutation of [query, kv, table, seq_lens, qsl, kwargs], exception, text the message names)
BAD = [
    ("query_type", _set(0, [[1.0]]), TypeError, "query"),
    ("query_ndim", _edit(0, lambda q: q[0]), ValueError, "query"),
    ("query_dtype", _edit(0, lambda q: q.to(torch.float64)), TypeError, "query"),
    ("kv_dtype", _edit(1, lambda k: k.to(torch.float32)), TypeError, "kv_cache"),
    ("kv_ndim", _edit(1, lambda k: k[:, 0]), ValueError, "kv_cache"),
    ("kv_not_kv_pair", _edit(1, lambda k: torch.cat([k, k[:, :1]], 1)), ValueError, "kv_cache"),
    ("kv_head_dim", _edit(1, lambda k: k[..., :16]), ValueError, "kv_cache"),
    ("kv_head_dim_stride", _edit(1, lambda k: k.transpose(3, 4).contiguous().transpose(3, 4)),
     ValueError, "kv_cache"),
    ("kv_device", _edit(1, lambda k: torch.empty(k.shape, dtype=k.dtype, device=META)),
     ValueError, "kv_cache"),
    ("heads_not_multiple", _edit(0, lambda q: q[:, :3]), ValueError, "query has 3 heads"),
    ("head_dim_too_big",
     lambda a: (a.__setitem__(0, torch.zeros(a[0].shape[0], 4, 288, dtype=a[0].dtype)),
                a.__setitem__(1, torch.zeros(*a[1].shape[:4], 288, dtype=a[1].dtype))),
     ValueError, "head_dim"),
    ("table_dtype", _edit(2, lambda t: t.long()), TypeError, "block_tables"),
    ("table_ndim", _edit(2, lambda t: t.reshape(-1)), ValueError, "block_tables"),
    ("table_device", _edit(2, lambda t: torch.empty(t.shape, dtype=t.dtype, device=META)),
     ValueError, "block_tables"),
    ("seq_lens_dtype", _edit(3, lambda t: t.long()), TypeError, "seq_lens"),
    ("seq_lens_shape", _edit(3, lambda t: t[:1]), ValueError, "seq_lens"),
    ("qsl_dtype", _edit(4, lambda t: t.long()), TypeError, "query_start_loc"),
    ("qsl_shape", _edit(4, lambda t: t[:2]), ValueError, "query_start_loc"),
    ("qsl_device", _edit(4, lambda t: torch.empty(t.shape, dtype=t.dtype, device=META)),
     ValueError, "query_start_loc"),
    ("qsl_start", _edit_values(4, lambda t: t.__setitem__(0, 1)), ValueError, "query_start_loc"),
    ("qsl_decreasing", _edit_values(4, lambda t: t.__setitem__(1, 50)), ValueError,
     "query_start_loc"),
    ("qsl_end", _edit_values(4, lambda t: t.__setitem__(2, 44)), ValueError, "query_start_loc"),
    ("queries_exceed_seq_len", _edit_values(3, lambda t: t.__setitem__(1, 4)), ValueError,
     "seq_lens"),
    ("seq_len_zero_with_queries", _edit_values(3, lambda t: t.__setitem__(1, 0)), ValueError,
     "seq_lens"),
    ("seq_len_negative_without_queries",
     lambda a: (a.__setitem__(3, torch.tensor([40, -3], dtype=torch.int32)),
                a.__setitem__(4, torch.tensor([0, 45, 45], dtype=torch.int32))),
     ValueError, "seq_lens"),
    ("table_too_narrow", _edit(2, lambda t: t[:, :2]), ValueError, "block_tables"),
    ("block_id_negative", _edit_values(2, lambda t: t.__setitem__((1, 2), -1)), ValueError,
     "block_tables"),
    ("block_id_too_large", _edit_values(2, lambda t: t.__setitem__((0, 0), 10_000)), ValueError,
     "block_tables"),
    ("scale_type", lambda a: a[5].__setitem__("scale", "0.5"), TypeError, "scale"),
    ("scale_nan", lambda a: a[5].__setitem__("scale", float("nan")), ValueError, "scale"),
    ("out_shape", lambda a: a[5].__setitem__("out", torch.zeros(45, 4, 16, dtype=torch.float16)),
     ValueError, "out"),
    ("out_dtype", lambda a: a[5].__setitem__("out", torch.zeros(45, 4, 32)), TypeError, "out"),
    ("out_device", lambda a: a[5].__setitem__("out", torch.zeros(45, 4, 32, dtype=torch.float16,
                                                                 device=META)), ValueError, "out"),
    ("out_stride", lambda a: a[5].__setitem__("out", torch.zeros(45, 32, 4, dtype=torch.float16)
                                              .transpose(1, 2)), ValueError, "out"),
]


@pytest.mark.parametrize("mutate,exc,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_and_leaves_out_unchanged(mutate, exc, name):
    query, kv, table, seq_lens, qsl = _good()
    out = torch.full(query.shape, 7.0, dtype=query.dtype)
    args = [query, kv, table, seq_lens, qsl, {"out": out}]
    mutate(args)
    with pytest.raises(exc, match=name):
        kernels.paged_prefill_attention(*args[:5], **args[5])
    assert (out == 7.0).all()


def test_public_call_validates_once(monkeypatch):
    # The public function validates; the custom op behind it trusts its arguments (it
    # does not validate again), and the kernel's own guards keep unchecked CUDA values in
    # bounds (test_kernel_guards_bad_indices_that_only_cuda_lets_through).
    calls = []
    real = pa._validate
    monkeypatch.setattr(pa, "_validate", lambda *a: calls.append(1) or real(*a))
    query, kv, table, seq_lens, qsl = _good()
    kernels.paged_prefill_attention(query, kv, table, seq_lens, qsl)
    assert len(calls) == 1


def test_unused_table_padding_is_not_checked():
    # Engines pad tables with -1 (or stale ids): only the blocks a sequence uses matter,
    # and a sequence with no queries is not read at all.
    query, kv, table, seq_lens, qsl = make_case([(40, 40), (33, 0)], 4, 2, 32, 16,
                                                torch.float16, seed=10, pad=-7, device="cpu")
    table[1, 0] = 10_000
    out = kernels.paged_prefill_attention(query, kv, table, seq_lens, qsl)
    assert_matches_reference(query, kv, table, seq_lens, qsl, out)


# ------------------------------------------------------------------ torch integration
def test_opcheck():
    query, kv, table, seq_lens, qsl = make_case([(20, 20), (18, 3)], 2, 1, 32, 8,
                                                torch.float16, seed=11)
    out = torch.empty_like(query)
    torch.library.opcheck(torch.ops.kvarena.paged_prefill_attention.default,
                          (query, kv, table, seq_lens, qsl, out, 0.2))


def test_torch_compile_aot_eager():
    args = make_case([(20, 20), (18, 3)], 2, 1, 32, 8, torch.float32, seed=12)

    def step(query, kv, table, seq_lens, qsl):
        out = torch.empty_like(query)
        torch.ops.kvarena.paged_prefill_attention(query, kv, table, seq_lens, qsl, out, 0.25)
        return out * 2

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(*args)
    ref = reference.paged_prefill_attention_ref(*args, scale=0.25) * 2
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


# ------------------------------------------------------------------ GPU, full size
GPU_CASES = [
    (torch.float16, 128, 32, 8, 16),
    (torch.bfloat16, 128, 32, 8, 16),
    (torch.float32, 64, 8, 8, 32),
    (torch.float16, 80, 16, 2, 8),
    (torch.bfloat16, 96, 12, 4, 32),
    (torch.float16, 112, 8, 1, 16),
    (torch.bfloat16, 120, 8, 8, 64),
    (torch.float16, 192, 16, 4, 16),
    (torch.bfloat16, 256, 8, 2, 128),
    (torch.float16, 32, 4, 4, 8),
]


def gpu_specs(bs):
    return [(4096, 4096), (3000, 1000), (1000, 1), (2 * bs, 0), (1, 1), (777, 777),
            (64 * bs, 3), (513, 512), (2048, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,head_dim,num_heads,num_kv_heads,block_size", GPU_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_gpu_full_size(dtype, head_dim, num_heads, num_kv_heads, block_size):
    args = make_case(gpu_specs(block_size), num_heads, num_kv_heads, head_dim, block_size, dtype,
                     num_layers=2, seed=head_dim, device="cuda")
    out = kernels.paged_prefill_attention(*args)
    ref = reference.paged_prefill_attention_ref(*args)
    tol = dict(TOL[dtype])
    if dtype == torch.bfloat16:  # compiled: softmax weights rounded to bf16 before PV
        tol = dict(atol=2 ** -5, rtol=2 ** -5)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    bs, heads, kv_heads, dim = 16, 8, 2, 128
    specs_a = [(300, 300), (200, 40), (90, 1), (64, 0)]
    specs_b = [(100, 60), (500, 250), (33, 30), (17, 1)]  # same token count, new lengths
    num_tokens = sum(q for _, q in specs_a)
    assert num_tokens == sum(q for _, q in specs_b)
    # Cache and tables sized for the longer of the two steps, so one table serves both.
    cover = [(max(a, b), 0) for (a, _), (b, _) in zip(specs_a, specs_b)]
    _, kv, table, _, _ = make_case(cover, heads, kv_heads, dim, bs, torch.float16, seed=1,
                                   device="cuda")

    def step_inputs(specs, seed):
        g = torch.Generator().manual_seed(seed)
        query = torch.randn((num_tokens, heads, dim), generator=g).to(torch.float16)
        lens = torch.tensor([s for s, _ in specs], dtype=torch.int32)
        qsl = torch.tensor([0] + [sum(q for _, q in specs[:i + 1]) for i in range(len(specs))],
                           dtype=torch.int32)
        return query.cuda(), lens.cuda(), qsl.cuda()

    query, seq_lens, qsl = step_inputs(specs_a, 2)
    out = torch.empty_like(query)
    kernels.paged_prefill_attention(query, kv, table, seq_lens, qsl, out=out)  # compile first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.paged_prefill_attention(query, kv, table, seq_lens, qsl, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(query, kv, table, seq_lens, qsl, out)
    # New queries and lengths written into the captured tensors, then replayed.
    for dst, src in zip((query, seq_lens, qsl), step_inputs(specs_b, 3)):
        dst.copy_(src)
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(query, kv, table, seq_lens, qsl, out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # garbage in, NaN arithmetic inside
@pytest.mark.skipif(not _runtime.INTERPRET, reason="checks the kernel's own guards under the interpreter")
def test_kernel_guards_bad_indices_that_only_cuda_lets_through():
    """On CUDA index values are not checked (that needs a sync), so the kernel itself must
    not read or write out of bounds for a bad block id, a too-long seq_len or a bad
    query_start_loc. Under the interpreter an unguarded access kills the process."""
    query, kv, table, seq_lens, qsl = make_case([(40, 40), (9, 3)], 4, 2, 32, 8, torch.float16)
    table[0, 1] = 10 ** 6          # a block id far outside the cache
    table[1, 0] = -5
    seq_lens[1] = 10 ** 5           # longer than the table can reach
    qsl_bad = qsl.clone()
    qsl_bad[1] = -7                 # queries before the start of `query`
    out = torch.full_like(query, float("nan"))
    pa._launch(query, kv, table, seq_lens, qsl_bad, out, 32 ** -0.5)
    # Sequence 0's rows at valid tokens were written from real (or zeroed) keys: finite.
    assert torch.isfinite(out[:3]).all()
