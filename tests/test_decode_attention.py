"""kernels.paged_decode_attention against the torch reference.

CPU runs go through Triton's interpreter (set in conftest.py): shapes are small, but the
grid covers head_dim 32..256 including non powers of two, MHA/GQA/MQA, block sizes 8..128,
all three dtypes, several context splits, per-layer strided cache views and shuffled block
tables. GPU tests (marked ``gpu``) repeat the grid at full size.
"""
import pytest
import torch

import kernels
from kernels import _runtime
import kernels.decode_attention as decode_mod
from kernels.decode_attention import choose_num_splits
from kernels.reference import paged_decode_attention_ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.float16: dict(atol=2e-3, rtol=2e-3),
       # The interpreter truncates fp32 -> bf16 where torch rounds: a bit over one ulp.
       torch.bfloat16: dict(atol=1e-2, rtol=2 ** -6)}


def make_case(num_seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seq_lens, *,
              num_layers=1, spare_blocks=3, extra_cols=1, device="cpu", seed=0):
    """Random query, a per-layer cache view of a block-major buffer, shuffled block tables.

    Each sequence gets distinct random block ids; table entries past a sequence's last
    block are -1 (they must never be read). Returns a dict of the kernel's arguments plus
    ``buffer`` (the whole block-major buffer) and ``layer``.
    """
    assert len(seq_lens) == num_seqs
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    width = max(need) + extra_cols
    layer = num_layers - 1
    buf = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim,
                      generator=g).to(dtype)
    ids = torch.randperm(num_blocks, generator=g)
    table = torch.full((num_seqs, width), -1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = ids[at:at + n].to(torch.int32)
        at += n
    # A query stored head-major, so its sequence stride is not the dense one.
    query = torch.randn(num_heads, num_seqs, head_dim, generator=g).to(dtype).transpose(0, 1)
    buf = buf.to(device)
    return dict(query=query.to(device), kv_cache=buf[:, layer], block_tables=table.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                buffer=buf, layer=layer)


def kernel_args(case):
    return {k: case[k] for k in ("query", "kv_cache", "block_tables", "seq_lens")}


def check_against_reference(case, **kw):
    args = kernel_args(case)
    cache_before = args["kv_cache"].clone()
    out = kernels.paged_decode_attention(**args, **kw)
    want = paged_decode_attention_ref(**args, scale=kw.get("scale"))
    assert out.shape == args["query"].shape and out.dtype == args["query"].dtype
    torch.testing.assert_close(out.float(), want.float(), **TOL[out.dtype])
    assert torch.equal(args["kv_cache"], cache_before)  # attention never writes the cache
    return out


# (head_dim, heads, kv_heads, block_size, dtype, seq_lens, layers)
CASES = [
    (32, 4, 4, 8, torch.float32, [1, 8, 40], 1),          # MHA, length 1, exact multiple
    (32, 8, 1, 16, torch.float16, [17, 64], 2),           # MQA
    (80, 4, 2, 16, torch.float16, [1, 48, 300], 3),       # GQA, non power of two
    (80, 6, 2, 8, torch.bfloat16, [33, 130], 1),
    (96, 4, 1, 32, torch.float32, [96, 7, 251], 2),
    (112, 2, 2, 16, torch.bfloat16, [160, 5], 1),
    (120, 8, 4, 8, torch.float16, [1, 1, 200], 2),
    (128, 4, 2, 16, torch.bfloat16, [256, 129], 2),
    (128, 2, 1, 128, torch.float16, [1, 300], 1),         # one block of 128
    (128, 16, 2, 32, torch.float32, [64, 250, 31], 1),
    (192, 4, 2, 16, torch.float16, [45, 160], 2),
    (192, 2, 2, 8, torch.bfloat16, [72], 1),
    (256, 4, 1, 16, torch.float32, [19, 64], 1),
    (64, 80, 1, 16, torch.float16, [40, 90], 1),          # MQA, group of 80 cut into 2 chunks
]


@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size,dtype,seq_lens,layers", CASES)
def test_decode_matches_reference(head_dim, heads, kv_heads, block_size, dtype, seq_lens, layers):
    case = make_case(len(seq_lens), heads, kv_heads, head_dim, block_size, dtype, seq_lens,
                     num_layers=layers)
    check_against_reference(case)


def _sampled_grid(n, seed=1234):
    """``n`` cases drawn (seeded, so the ids are stable) from the full product of head_dim x
    head layout x block size x dtype x split override, with random context lengths."""
    import random

    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        head_dim = rng.choice([32, 64, 80, 96, 112, 120, 128, 160, 192])
        kv_heads, group = rng.choice([(1, 1), (2, 1), (1, 4), (2, 2), (2, 3), (1, 7), (1, 16)])
        block_size = rng.choice([8, 16, 32, 64])
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
        lens = [rng.choice([1, block_size, rng.randint(2, 300)]) for _ in range(rng.randint(1, 3))]
        cases.append((head_dim, kv_heads * group, kv_heads, block_size, dtype, lens,
                      rng.choice([None, None, 1, 3, 4])))
    return cases


@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size,dtype,seq_lens,num_splits",
                         _sampled_grid(24))
def test_decode_sampled_grid(head_dim, heads, kv_heads, block_size, dtype, seq_lens, num_splits):
    case = make_case(len(seq_lens), heads, kv_heads, head_dim, block_size, dtype, seq_lens,
                     num_layers=2, seed=head_dim * block_size)
    check_against_reference(case, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_decode_any_split_count_gives_the_same_result(num_splits):
    # 16 splits of a 300-token context leaves most splits empty for the short sequences.
    case = make_case(3, 4, 2, 64, 16, torch.float32, [300, 20, 1], num_layers=2)
    check_against_reference(case, num_splits=num_splits)


def test_default_split_count_splits_long_contexts():
    # One sequence, one KV head, 300 tokens: the CPU heuristic uses several splits, so the
    # merge kernel runs in the default path too.
    case = make_case(1, 2, 1, 64, 16, torch.float16, [300])
    n = choose_num_splits(1, 1, case["block_tables"].shape[1] * 16, torch.device("cpu"))
    assert n > 1
    check_against_reference(case)


def test_choose_num_splits_from_shapes():
    cpu = torch.device("cpu")
    assert choose_num_splits(64, 8, 1 << 15, cpu) == 1            # the batch fills the device
    assert choose_num_splits(1, 1, 16, cpu) == 1                  # too short to split
    # one program alone: split up to the nominal 4 CPU "SMs"; the cap binds beyond them
    assert choose_num_splits(1, 1, 1 << 20, cpu) == decode_mod._CPU_NOMINAL_SMS
    assert decode_mod.MAX_SPLITS < (1 << 20) // decode_mod._MIN_SPLIT_TOKENS_CPU
    assert choose_num_splits(1, 2, 1 << 20, cpu) >= 2


def test_decode_scale_and_out():
    case = make_case(2, 4, 2, 80, 16, torch.float16, [50, 13])
    # A strided out (head-major storage); the call writes it and returns it.
    out = torch.full((4, 2, 80), float("nan"), dtype=torch.float16).transpose(0, 1)
    got = check_against_reference(case, scale=0.3, out=out)
    assert got is out
    want_default = paged_decode_attention_ref(**kernel_args(case))
    assert not torch.allclose(out.float(), want_default.float(), atol=1e-2)  # scale mattered


@pytest.mark.parametrize("query_dtype,cache_dtype", [(torch.float32, torch.float16),
                                                     (torch.float16, torch.bfloat16)])
def test_decode_query_dtype_may_differ_from_cache(query_dtype, cache_dtype):
    # The kernel computes in float32 then; the output takes the query's dtype.
    case = make_case(2, 8, 2, 64, 16, cache_dtype, [100, 7])
    case["query"] = case["query"].to(query_dtype)
    check_against_reference(case, num_splits=2)


def test_decode_no_sequences():
    case = make_case(1, 2, 1, 32, 8, torch.float32, [5])
    args = kernel_args(case)
    args.update(query=args["query"][:0], block_tables=args["block_tables"][:0],
                seq_lens=args["seq_lens"][:0])
    assert kernels.paged_decode_attention(**args).shape == (0, 2, 32)


def test_decode_torch_fallback_matches(monkeypatch):
    """Without the interpreter, CPU calls take the reference path: same result."""
    monkeypatch.setattr(_runtime, "use_triton", lambda *t: False)
    case = make_case(2, 4, 2, 64, 16, torch.float32, [70, 3])
    check_against_reference(case)


def test_write_then_decode_sees_the_new_token():
    """seq_lens counts the current token: write its K/V, then attend over it."""
    case = make_case(2, 4, 2, 64, 16, torch.float32, [17, 32])
    args = kernel_args(case)
    key = torch.randn(2, 2, 64) * 4
    value = torch.randn(2, 2, 64)
    table = args["block_tables"]
    slots = torch.tensor([int(table[0, 1]) * 16 + 0, int(table[1, 1]) * 16 + 15])
    kernels.write_kv(args["kv_cache"], key, value, slots)
    check_against_reference(case)


# --- bad input: one test per error, nothing written --------------------------------------

def _good_args():
    case = make_case(2, 4, 2, 32, 8, torch.float16, [9, 20])
    args = kernel_args(case)
    args["out"] = torch.zeros(2, 4, 32, dtype=torch.float16)
    return args


def _table_with(value, col=1):
    def make(a):
        t = a["block_tables"].clone()
        t[1, col] = value
        return t
    return make


# (id, argument, replacement builder, exception type, name the message must hold)
BAD = [
    ("query-not-tensor", "query", lambda a: a["query"].tolist(), TypeError, "query"),
    ("query-dtype", "query", lambda a: a["query"].to(torch.float64), TypeError, "query"),
    ("query-ndim", "query", lambda a: a["query"][0], ValueError, "query"),
    ("query-head-dim", "query", lambda a: a["query"][..., :16], ValueError, "query"),
    ("query-heads-not-multiple", "query", lambda a: a["query"][:, :3], ValueError, "query"),
    ("query-device", "query", lambda a: a["query"].to("meta"), ValueError, "query"),
    ("cache-dtype", "kv_cache", lambda a: a["kv_cache"].to(torch.int8), TypeError, "kv_cache"),
    ("cache-shape", "kv_cache", lambda a: a["kv_cache"][:, :1], ValueError, "kv_cache"),
    ("cache-head-dim-too-big", "kv_cache",
     lambda a: torch.zeros(4, 2, 8, 2, 320, dtype=torch.float16), ValueError, "kv_cache"),
    ("tables-dtype", "block_tables", lambda a: a["block_tables"].long(), TypeError,
     "block_tables"),
    ("tables-rows", "block_tables", lambda a: a["block_tables"][:1], ValueError, "block_tables"),
    ("tables-no-columns", "block_tables", lambda a: a["block_tables"][:, :0], ValueError,
     "block_tables"),
    ("tables-negative-id", "block_tables", _table_with(-1), ValueError, "block_tables"),
    ("tables-id-too-big", "block_tables", _table_with(10 ** 6, col=2), ValueError,
     "block_tables"),
    ("lens-dtype", "seq_lens", lambda a: a["seq_lens"].long(), TypeError, "seq_lens"),
    ("lens-length", "seq_lens", lambda a: a["seq_lens"][:1], ValueError, "seq_lens"),
    ("lens-zero", "seq_lens", lambda a: torch.tensor([0, 20], dtype=torch.int32), ValueError,
     "seq_lens"),
    ("lens-beyond-table", "seq_lens",
     lambda a: torch.tensor([9, a["block_tables"].shape[1] * 8 + 1], dtype=torch.int32),
     ValueError, "seq_lens"),
    ("scale-type", "scale", lambda a: "0.5", TypeError, "scale"),
    ("scale-nan", "scale", lambda a: float("nan"), ValueError, "scale"),
    ("out-shape", "out", lambda a: torch.zeros(2, 4, 16, dtype=torch.float16), ValueError, "out"),
    ("out-dtype", "out", lambda a: torch.zeros(2, 4, 32), TypeError, "out"),
    ("out-device", "out", lambda a: torch.zeros(2, 4, 32, dtype=torch.float16, device="meta"),
     ValueError, "out"),
    ("num-splits", "num_splits", lambda a: 0, ValueError, "num_splits"),
]


@pytest.mark.parametrize("arg,make_bad,exc,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_decode_rejects_bad_input(arg, make_bad, exc, name):
    args = _good_args()
    cache, out = args["kv_cache"], args["out"]
    cache_before, out_before = cache.clone(), out.clone()
    args[arg] = make_bad(args)
    with pytest.raises(exc, match=name):
        kernels.paged_decode_attention(**args)
    assert torch.equal(cache, cache_before)
    assert torch.equal(out, out_before)


def test_decode_unused_table_entries_are_not_checked():
    # Entries past a sequence's last block may hold anything (engines pad with garbage).
    args = _good_args()
    args["block_tables"][0, 2:] = 10 ** 6  # seq 0 uses 2 blocks of 8 for 9 tokens
    out = kernels.paged_decode_attention(**args)
    want = paged_decode_attention_ref(**{k: args[k] for k in
                                         ("query", "kv_cache", "block_tables", "seq_lens")})
    torch.testing.assert_close(out, want, **TOL[torch.float16])


# --- CUDA: full-size grid ----------------------------------------------------------------

GPU_CASES = [
    (64, 32, 8, 16, torch.float16, 8, 2000),
    (80, 32, 8, 16, torch.bfloat16, 4, 3000),
    (96, 16, 16, 32, torch.float16, 16, 1500),
    (128, 32, 8, 16, torch.bfloat16, 32, 4000),
    (128, 32, 8, 16, torch.float16, 1, 33000),      # one long sequence: many splits
    (128, 64, 1, 128, torch.float16, 4, 5000),      # MQA, group of 64
    (128, 32, 32, 8, torch.float32, 8, 1000),       # MHA, fp32: the broadcast (no tl.dot) path
    (192, 16, 4, 16, torch.bfloat16, 8, 2500),
    (256, 8, 2, 16, torch.float16, 4, 2000),
    (256, 8, 8, 64, torch.float32, 2, 1200),
]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads,kv_heads,block_size,dtype,num_seqs,max_len", GPU_CASES)
def test_decode_cuda(head_dim, heads, kv_heads, block_size, dtype, num_seqs, max_len):
    g = torch.Generator().manual_seed(head_dim + num_seqs)
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=g).tolist()
    lens[0] = max_len
    if num_seqs > 2:
        lens[1], lens[2] = 1, block_size * 3
    case = make_case(num_seqs, heads, kv_heads, head_dim, block_size, dtype, lens,
                     num_layers=2, device="cuda")
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
           torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}[dtype]
    args = kernel_args(case)
    want = paged_decode_attention_ref(**args)
    for splits in (None, 1, 7):
        out = kernels.paged_decode_attention(**args, num_splits=splits)
        torch.testing.assert_close(out.float(), want.float(), **tol)
