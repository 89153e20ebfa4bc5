"""kernels.compact_blocks under the Triton interpreter against its torch reference."""
import pytest
import torch

import kernels
from kernels import _runtime
from kernels.reference import compact_blocks_ref

pytestmark = pytest.mark.skipif(not _runtime.INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a GPU to run the kernel")


def random_moves(num_blocks, num_moves, gen):
    perm = torch.randperm(num_blocks, generator=gen)
    return perm[:num_moves], perm[num_moves:2 * num_moves]


@pytest.mark.parametrize("dtype, block_shape, idx_dtype", [
    (torch.float16, (2, 2, 16, 2, 80), torch.int32),   # 20 KiB blocks: several copy tiles
    (torch.bfloat16, (1, 2, 8, 1, 32), torch.int64),
    (torch.float32, (3, 2, 4, 2, 12), torch.int32),
    (torch.float16, (1, 2, 1, 1, 3), torch.int64),     # 12-byte block: word copy
    (torch.float16, (1, 1, 1, 1, 3), torch.int64),     # 6-byte block: byte copy
])
def test_matches_reference(dtype, block_shape, idx_dtype):
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(24, *block_shape, generator=gen).to(dtype)
    src, dst = random_moves(24, 7, gen)
    table = torch.randint(-1, 24, (3, 9), generator=gen, dtype=torch.int32)
    want_blocks, want_table = blocks.clone(), table.clone()
    compact_blocks_ref(want_blocks, src, dst, want_table)
    kernels.compact_blocks(blocks, src.to(idx_dtype), dst.to(idx_dtype), table)
    assert torch.equal(blocks.view(torch.uint8), want_blocks.view(torch.uint8))
    assert torch.equal(table, want_table)


def test_untouched_blocks_and_entries_stay():
    blocks = torch.arange(10 * 32, dtype=torch.float32).view(10, 2, 16)
    before = blocks.clone()
    table = torch.tensor([[9, 8, -1], [3, 9, 1]], dtype=torch.int32)
    kernels.compact_blocks(blocks, torch.tensor([9, 8]), torch.tensor([0, 2]), table)
    assert torch.equal(blocks[0], before[9]) and torch.equal(blocks[2], before[8])
    keep = [1, 3, 4, 5, 6, 7, 8, 9]
    assert torch.equal(blocks[keep], before[keep])  # sources keep their bytes (a copy)
    assert table.tolist() == [[0, 2, -1], [3, 0, 1]]


def test_no_moves_is_a_no_op():
    blocks = torch.ones(4, 8)
    table = torch.tensor([1, 2], dtype=torch.int32)
    kernels.compact_blocks(blocks, torch.empty(0, dtype=torch.int64),
                           torch.empty(0, dtype=torch.int64), table)
    assert table.tolist() == [1, 2] and torch.all(blocks == 1)


@pytest.mark.parametrize("src, dst, match", [
    ([0, 0], [1, 2], "src repeats"),
    ([0, 1], [2, 2], "dst repeats"),
    ([0, 1], [1, 2], "disjoint"),
    ([0, 9], [1, 2], r"src holds block ids in \[0, 9\] outside \[0, 4\)"),
    ([0], [-1], "dst holds block ids"),
    ([0, 1], [2], "same length"),
])
def test_bad_moves(src, dst, match):
    blocks = torch.zeros(4, 8)
    table = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        kernels.compact_blocks(blocks, torch.tensor(src), torch.tensor(dst), table)
    assert torch.all(blocks == 0) and table.tolist() == [0, 1]


def test_bad_arguments():
    blocks = torch.zeros(4, 8)
    ok = torch.tensor([0]), torch.tensor([1])
    with pytest.raises(TypeError, match="src must have dtype"):
        kernels.compact_blocks(blocks, torch.tensor([0.0]), ok[1])
    with pytest.raises(ValueError, match="dst must have 1 dimensions"):
        kernels.compact_blocks(blocks, ok[0], torch.tensor([[1]]))
    with pytest.raises(ValueError, match="blocks must be contiguous"):
        kernels.compact_blocks(blocks.t(), *ok)
    with pytest.raises(TypeError, match="block_tables must have dtype"):
        kernels.compact_blocks(blocks, *ok, torch.tensor([0], dtype=torch.int64))
    with pytest.raises(ValueError, match="block_tables is rewritten in place"):
        kernels.compact_blocks(blocks, *ok, torch.zeros(1, 2, dtype=torch.int32).expand(3, 2))
    with pytest.raises(TypeError, match="blocks must be a torch.Tensor"):
        kernels.compact_blocks(None, *ok)


@pytest.mark.skipif(not _runtime.INTERPRET, reason="checks the kernel's own guards")
def test_kernel_ignores_bad_ids_that_only_cuda_lets_through(monkeypatch):
    """On CUDA id values are not checked on the host; a bad move must copy and remap
    nothing (under the interpreter an unguarded access would kill the process)."""
    from kernels import compact

    monkeypatch.setattr(compact, "_validate", lambda *args: None)
    blocks = torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
    before = blocks.clone()
    table = torch.tensor([7, 6, 5, 1], dtype=torch.int32)
    src = torch.tensor([7, 10 ** 6, 6], dtype=torch.int64)
    dst = torch.tensor([0, 1, -3], dtype=torch.int64)
    kernels.compact_blocks(blocks, src, dst, table)
    assert torch.equal(blocks[0], before[7])          # the good move happened
    assert torch.equal(blocks[1:], before[1:])        # the bad ones touched nothing
    assert table.tolist() == [0, 6, 5, 1]


def test_a_buffer_starting_off_a_word_boundary_copies_bytes():
    """A contiguous buffer whose start is 2 bytes past a 4-byte boundary cannot be viewed as
    32-bit words; the copy falls back to bytes instead of raising an unlabelled error."""
    blocks = torch.arange(99, dtype=torch.float16)[1:].view(49, 2)   # 4-byte blocks
    want = blocks.clone()
    src, dst = torch.tensor([40, 41]), torch.tensor([1, 2])
    table = torch.tensor([[40, 3, 41]], dtype=torch.int32)
    want_table = table.clone()
    compact_blocks_ref(want, src, dst, want_table)
    kernels.compact_blocks(blocks, src, dst, table)
    assert torch.equal(blocks, want) and torch.equal(table, want_table)
