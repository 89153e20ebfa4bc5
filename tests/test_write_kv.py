"""kernels.write_kv against the torch reference (Triton interpreter on CPU, compiled on CUDA)."""
import importlib

import pytest
import torch

import kernels
from kernels import _runtime
from kernels.reference import write_kv_ref

# The package exports a function of the same name, so fetch the module itself.
write_kv_mod = importlib.import_module("kernels.write_kv")


def make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, *, num_layers=1,
               layer=0, device="cpu", seed=0):
    """Random cache. With num_layers > 1 the cache is ``buffer[:, layer]`` of a block-major
    ``[num_blocks, num_layers, 2, block_size, H, D]`` buffer, as the arena hands it out."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim,
                      generator=g).to(device=device, dtype=dtype)
    return buf, buf[:, layer]


def make_tokens(num_tokens, num_kv_heads, head_dim, dtype, *, strided, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    if strided:
        # Token-major storage with heads innermost: head_dim is not contiguous at all.
        k = torch.randn(num_tokens, head_dim, num_kv_heads, generator=g).transpose(1, 2)
        v = torch.randn(num_tokens, head_dim + 3, num_kv_heads, generator=g)[:, :head_dim]
        v = v.transpose(1, 2)
    else:
        k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
        v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)


def random_slots(num_tokens, num_slots, *, skip_every=0, device="cpu", seed=2):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens].to(torch.int64)
    if skip_every:
        slots[::skip_every] = -1
    return slots.to(device)


def assert_cache_close(got, want):
    if got.dtype == torch.bfloat16:
        # The interpreter truncates fp32 -> bf16 where torch rounds: allow one ulp.
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# (head_dim, num_kv_heads, block_size, cache dtype, key dtype, layers, num_tokens, strided)
CASES = [
    (32, 1, 8, torch.float16, torch.float16, 1, 5, False),
    (80, 2, 16, torch.float16, torch.float32, 3, 17, False),
    (128, 4, 16, torch.bfloat16, torch.bfloat16, 2, 9, True),
    (128, 2, 32, torch.bfloat16, torch.float32, 1, 33, False),
    (192, 2, 16, torch.float32, torch.float16, 2, 12, True),
    (256, 1, 8, torch.float32, torch.float32, 1, 4, False),
    (96, 3, 128, torch.float16, torch.bfloat16, 2, 7, False),
    (120, 5, 8, torch.bfloat16, torch.float16, 1, 20, True),
]


@pytest.mark.parametrize(
    "head_dim,heads,block_size,cache_dtype,key_dtype,layers,num_tokens,strided", CASES)
def test_write_kv_matches_reference(head_dim, heads, block_size, cache_dtype, key_dtype, layers,
                                    num_tokens, strided):
    num_blocks = max(4, 2 * num_tokens // block_size + 2)
    buf, cache = make_cache(num_blocks, block_size, heads, head_dim, cache_dtype,
                            num_layers=layers, layer=layers - 1)
    key, value = make_tokens(num_tokens, heads, head_dim, key_dtype, strided=strided)
    slots = random_slots(num_tokens, num_blocks * block_size, skip_every=3)
    want_buf = buf.clone()
    write_kv_ref(want_buf[:, layers - 1], key, value, slots)
    assert kernels.write_kv(cache, key, value, slots) is None
    assert_cache_close(buf[:, layers - 1], want_buf[:, layers - 1])
    # Other layers of the block-major buffer are untouched, bit for bit.
    for other in range(layers - 1):
        assert torch.equal(buf[:, other], want_buf[:, other])


def test_write_kv_skips_negative_slots():
    buf, cache = make_cache(4, 8, 2, 32, torch.float32)
    before = cache.clone()
    key, value = make_tokens(3, 2, 32, torch.float32, strided=False)
    kernels.write_kv(cache, key, value, torch.tensor([-1, 9, -5]))
    assert torch.equal(cache[1, 0, 1], key[1]) and torch.equal(cache[1, 1, 1], value[1])
    cache[1, :, 1] = before[1, :, 1]
    assert torch.equal(cache, before)


def test_write_kv_no_tokens_is_a_no_op():
    _, cache = make_cache(2, 8, 1, 32, torch.float16)
    before = cache.clone()
    kernels.write_kv(cache, torch.empty(0, 1, 32), torch.empty(0, 1, 32),
                     torch.empty(0, dtype=torch.int64))
    assert torch.equal(cache, before)


def test_write_kv_torch_fallback_matches(monkeypatch):
    """Without the interpreter, CPU calls take the reference path: same result."""
    monkeypatch.setattr(_runtime, "use_triton", lambda *t: False)
    _, cache = make_cache(6, 16, 2, 64, torch.float16)
    want = cache.clone()
    key, value = make_tokens(10, 2, 64, torch.float16, strided=True)
    slots = random_slots(10, 96, skip_every=4)
    write_kv_ref(want, key, value, slots)
    kernels.write_kv(cache, key, value, slots)
    assert torch.equal(cache, want)


def _good():
    _, cache = make_cache(4, 8, 2, 32, torch.float16)
    key, value = make_tokens(3, 2, 32, torch.float16, strided=False)
    return dict(kv_cache=cache, key=key, value=value, slot_mapping=torch.tensor([0, 5, 31]))


# (id, argument to replace, replacement builder, exception type, name the message must hold)
BAD = [
    ("cache-not-tensor", "kv_cache", lambda a: a["kv_cache"].numpy(), TypeError, "kv_cache"),
    ("cache-ndim", "kv_cache", lambda a: a["kv_cache"][0], ValueError, "kv_cache"),
    ("cache-not-kv-pair", "kv_cache", lambda a: torch.zeros(4, 3, 8, 2, 32, dtype=torch.float16),
     ValueError, "kv_cache"),
    ("cache-int-dtype", "kv_cache", lambda a: torch.zeros(4, 2, 8, 2, 32, dtype=torch.int16),
     TypeError, "kv_cache"),
    ("cache-head-dim-strided", "kv_cache",
     lambda a: torch.zeros(4, 2, 8, 32, 2, dtype=torch.float16).transpose(3, 4), ValueError,
     "kv_cache"),
    ("key-dtype", "key", lambda a: a["key"].to(torch.int32), TypeError, "key"),
    ("key-heads", "key", lambda a: torch.zeros(3, 1, 32), ValueError, "key"),
    ("key-head-dim", "key", lambda a: torch.zeros(3, 2, 16), ValueError, "key"),
    ("key-device", "key", lambda a: a["key"].to("meta"), ValueError, "key"),
    ("value-shape", "value", lambda a: a["value"][:2], ValueError, "value"),
    ("value-dtype", "value", lambda a: a["value"].to(torch.float64), TypeError, "value"),
    ("slots-dtype", "slot_mapping", lambda a: a["slot_mapping"].to(torch.int32), TypeError,
     "slot_mapping"),
    ("slots-length", "slot_mapping", lambda a: a["slot_mapping"][:2], ValueError, "slot_mapping"),
    ("slots-2d", "slot_mapping", lambda a: a["slot_mapping"][None], ValueError, "slot_mapping"),
    ("slot-out-of-range", "slot_mapping", lambda a: torch.tensor([0, 32, 1]), ValueError,
     "slot_mapping"),
]


@pytest.mark.parametrize("arg,make_bad,exc,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_write_kv_rejects_bad_input(arg, make_bad, exc, name):
    args = _good()
    cache = args["kv_cache"]
    before = cache.clone()
    args[arg] = make_bad(args)
    with pytest.raises(exc, match=name):
        kernels.write_kv(**args)
    assert torch.equal(cache, before)


# --- CUDA: the same kinds of cases at full size --------------------------------------------

GPU_CASES = [
    (64, 8, 16, torch.float16, torch.float16, 4, 4096),
    (80, 8, 16, torch.bfloat16, torch.float32, 2, 3000),
    (128, 8, 32, torch.float16, torch.float32, 4, 2048),
    (128, 32, 16, torch.bfloat16, torch.bfloat16, 1, 513),
    (192, 4, 128, torch.float32, torch.float16, 2, 1000),
    (256, 2, 8, torch.bfloat16, torch.bfloat16, 2, 777),
]


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,heads,block_size,cache_dtype,key_dtype,layers,num_tokens",
                         GPU_CASES)
def test_write_kv_cuda(head_dim, heads, block_size, cache_dtype, key_dtype, layers, num_tokens):
    num_blocks = 2 * num_tokens // block_size + 8
    buf, cache = make_cache(num_blocks, block_size, heads, head_dim, cache_dtype,
                            num_layers=layers, layer=layers // 2, device="cuda")
    key, value = make_tokens(num_tokens, heads, head_dim, key_dtype, strided=True, device="cuda")
    slots = random_slots(num_tokens, num_blocks * block_size, skip_every=7, device="cuda")
    want = buf.clone()
    write_kv_ref(want[:, layers // 2], key, value, slots)
    kernels.write_kv(cache, key, value, slots)
    torch.cuda.synchronize()
    # On a GPU fp32 -> bf16 rounds to nearest like torch: the results are identical.
    assert torch.equal(buf, want)
