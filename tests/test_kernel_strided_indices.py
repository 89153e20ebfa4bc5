"""Every kernel reads every index tensor through its stride (issue 11 §1).

Each kernel is called with index tensors given as ``[::2]`` views, columns of a packed 2-D
int tensor (``meta[:, 1]``) and expanded (stride 0) views, on both CPU paths: Triton's
interpreter and the torch-reference fallback. The result must equal the reference run on
contiguous copies of the same indices. The padding next to the selected elements holds
values that would corrupt the result (or read out of bounds) if the stride were ignored.
"""
import pytest
import torch

import kernels
from kernels import _runtime, reference

PATHS = ["interpreter", "reference"]
POISON = 10 ** 6  # a value no valid index has: reading it instead corrupts or faults


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "interpreter":
        if not _runtime.INTERPRET:
            pytest.skip("needs TRITON_INTERPRET=1")
    else:
        monkeypatch.setattr(_runtime, "use_triton", lambda *tensors: False)
    return request.param


def strided(x: torch.Tensor, fill=POISON) -> torch.Tensor:
    """``x``'s values as the even elements of a twice-as-long buffer (stride 2)."""
    buf = torch.full((2 * x.numel(),), fill, dtype=x.dtype)
    buf[::2] = x
    return buf[::2]


def column(x: torch.Tensor, fill=POISON) -> torch.Tensor:
    """``x``'s values as column 1 of a packed ``[n, 3]`` metadata tensor (stride 3)."""
    meta = torch.full((x.numel(), 3), fill, dtype=x.dtype)
    meta[:, 1] = x
    return meta[:, 1]


VIEWS = {"strided": strided, "column": column}


# --- the exact reproducers of issue 11 ---------------------------------------------------

def test_issue11_write_kv_strided_slot_mapping(path):
    kv = torch.zeros(6, 2, 8, 2, 16)
    k = torch.ones(3, 2, 16)
    kernels.write_kv(kv, k, k, torch.tensor([0, 40, 9, 41, -1, 42])[::2])  # logical [0, 9, -1]
    want = torch.zeros_like(kv)
    reference.write_kv_ref(want, k, k, torch.tensor([0, 9, -1]))
    assert torch.equal(kv, want)
    assert kv[5, :, 0].abs().sum() == 0  # slot 40 (block 5, offset 0) was not written


def test_issue11_compact_blocks_column_moves(path):
    b = torch.arange(8.).repeat_interleave(4).reshape(8, 4)
    pairs = torch.tensor([[5, 2], [6, 3], [7, 4]])
    kernels.compact_blocks(b, pairs[:, 0], pairs[:, 1])
    assert b[:, 0].tolist() == [0, 1, 5, 6, 7, 5, 6, 7]  # live block 6 keeps its bytes


def test_issue11_expanded_slot_mapping_reads_one_element(path):
    kv = torch.zeros(8, 2, 8, 2, 16)
    k = torch.randn(1, 2, 16).expand(64, 2, 16)  # every token the same, so any may win
    kernels.write_kv(kv, k, k, torch.tensor([5]).expand(64))
    want = torch.zeros_like(kv)
    reference.write_kv_ref(want, k[:1], k[:1], torch.tensor([5]))
    assert torch.equal(kv, want)


# --- write_kv ----------------------------------------------------------------------------

@pytest.mark.parametrize("view", VIEWS)
def test_write_kv_slot_mapping_views(path, view):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(6, 2, 4, 2, 24, generator=g)  # head_dim 24: not a power of two
    k, v = torch.randn(5, 2, 24, generator=g), torch.randn(5, 2, 24, generator=g)
    slots = torch.tensor([3, 17, -1, 22, 8])
    want = kv.clone()
    reference.write_kv_ref(want, k, v, slots)
    kernels.write_kv(kv, k, v, VIEWS[view](slots, fill=23))  # 23: a valid, wrong slot
    assert torch.equal(kv, want)


# --- decode ------------------------------------------------------------------------------

def decode_case(seed=0, lens=(17, 5, 9)):
    g = torch.Generator().manual_seed(seed)
    bs, width = 4, 6
    kv = torch.randn(20, 2, bs, 2, 24, generator=g)
    table = torch.randperm(20, generator=g)[:3 * width].view(3, width).to(torch.int32)
    q = torch.randn(3, 4, 24, generator=g)
    return q, kv, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("view", VIEWS)
def test_decode_seq_lens_and_table_views(path, view):
    q, kv, table, lens = decode_case()
    want = reference.paged_decode_attention_ref(q, kv, table, lens)
    # The table as every other column of a wider one, lengths as a strided view.
    wide = torch.full((3, 2 * table.shape[1]), -1, dtype=torch.int32)
    wide[:, ::2] = table
    got = kernels.paged_decode_attention(q, kv, wide[:, ::2], VIEWS[view](lens, fill=1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_expanded_indices(path):
    q, kv, table, _ = decode_case(seed=1)
    lens = torch.tensor([13], dtype=torch.int32).expand(3)
    rows = table[:1].expand(3, -1)  # three sequences sharing one block list (read-only)
    want = reference.paged_decode_attention_ref(q, kv, rows.contiguous(), lens.contiguous())
    got = kernels.paged_decode_attention(q, kv, rows, lens)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_column_of_packed_metadata(path):
    """seq_lens and a block table that are slices of one packed int32 tensor."""
    q, kv, table, lens = decode_case(seed=2)
    packed = torch.full((3, 1 + table.shape[1] + 2), POISON, dtype=torch.int32)
    packed[:, 0] = lens
    packed[:, 1:1 + table.shape[1]] = table
    want = reference.paged_decode_attention_ref(q, kv, table, lens)
    got = kernels.paged_decode_attention(q, kv, packed[:, 1:1 + table.shape[1]], packed[:, 0])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- prefill -----------------------------------------------------------------------------

def prefill_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    bs, width = 4, 6
    kv = torch.randn(20, 2, bs, 2, 24, generator=g)
    table = torch.randperm(20, generator=g)[:3 * width].view(3, width).to(torch.int32)
    lens = torch.tensor([17, 5, 9], dtype=torch.int32)
    qsl = torch.tensor([0, 6, 7, 16], dtype=torch.int32)  # q_lens 6, 1, 9
    q = torch.randn(16, 4, 24, generator=g)
    return q, kv, table, lens, qsl


@pytest.mark.parametrize("view", VIEWS)
def test_prefill_index_views(path, view):
    q, kv, table, lens, qsl = prefill_case()
    want = reference.paged_prefill_attention_ref(q, kv, table, lens, qsl)
    wide = torch.full((3, 2 * table.shape[1]), POISON, dtype=torch.int32)
    wide[:, ::2] = table  # column stride 2: the kernel must not read the poison columns
    make = VIEWS[view]
    got = kernels.paged_prefill_attention(q, kv, wide[:, ::2], make(lens, fill=3),
                                          make(qsl, fill=0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_prefill_expanded_indices(path):
    q, kv, table, _, qsl = prefill_case(seed=1)
    lens = torch.tensor([16], dtype=torch.int32).expand(3)
    rows = table[1:2].expand(3, -1)
    want = reference.paged_prefill_attention_ref(q, kv, rows.contiguous(), lens.contiguous(), qsl)
    got = kernels.paged_prefill_attention(q, kv, rows, lens, qsl)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- compact_blocks ----------------------------------------------------------------------

def compact_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randn(12, 2, 3, generator=g)
    table = torch.randint(-1, 12, (4, 5), generator=g, dtype=torch.int32)
    return blocks, torch.tensor([9, 11, 4]), torch.tensor([0, 2, 7]), table


@pytest.mark.parametrize("view", VIEWS)
def test_compact_move_views(path, view):
    blocks, src, dst, table = compact_case()
    want_b, want_t = blocks.clone(), table.clone()
    reference.compact_blocks_ref(want_b, src, dst, want_t)
    # Poison 1: a valid id, so a kernel ignoring the stride would move the wrong blocks.
    kernels.compact_blocks(blocks, VIEWS[view](src, fill=1), VIEWS[view](dst, fill=1), table)
    assert torch.equal(blocks, want_b) and torch.equal(table, want_t)


TABLE_LAYOUTS = {
    # name: (storage shape, view of that storage that is the table)
    "transposed": ((5, 4), lambda t: t.t()),
    "every_other_column": ((4, 10), lambda t: t[:, ::2]),
    "column_slice": ((4, 8), lambda t: t[:, 1:6]),
    "one_row_of_3d": ((2, 4, 5), lambda t: t[1]),
    "3d_not_foldable": ((3, 4, 10), lambda t: t[:, :, ::2][:, ::1][:2].transpose(0, 1)),
}


@pytest.mark.parametrize("layout", TABLE_LAYOUTS)
def test_compact_block_table_layouts(path, layout):
    blocks, src, dst, _ = compact_case(seed=3)
    shape, make_view = TABLE_LAYOUTS[layout]
    g = torch.Generator().manual_seed(4)
    storage = torch.randint(-1, 12, shape, generator=g, dtype=torch.int32)
    table = make_view(storage)
    before = storage.clone()
    want_b, want_t = blocks.clone(), table.clone()
    reference.compact_blocks_ref(want_b, src, dst, want_t)
    kernels.compact_blocks(blocks, src, dst, table)
    assert torch.equal(blocks, want_b) and torch.equal(table, want_t)
    # Storage outside the view is untouched.
    outside = torch.ones_like(storage, dtype=torch.bool)
    make_view(outside).fill_(False)
    assert torch.equal(storage[outside], before[outside])


def test_compact_rejects_an_expanded_block_table(path):
    blocks, src, dst, table = compact_case()
    shared = table[:1].expand(4, -1)
    with pytest.raises(ValueError, match="block_tables.*expanded"):
        kernels.compact_blocks(blocks, src, dst, shared)


def test_compact_expanded_single_move(path):
    blocks, _, _, table = compact_case(seed=5)
    want_b, want_t = blocks.clone(), table.clone()
    reference.compact_blocks_ref(want_b, torch.tensor([9]), torch.tensor([0]), want_t)
    kernels.compact_blocks(blocks, torch.tensor([9]).expand(1), torch.tensor([0]).expand(1),
                           table)
    assert torch.equal(blocks, want_b) and torch.equal(table, want_t)
