import pytest
import torch

from tq_vllm.record.packing import (
    pack_indices,
    pack_signs,
    packed_bytes,
    unpack_indices,
    unpack_signs,
)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [64, 96, 128, 256, 17])
def test_round_trip(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    idx = torch.randint(0, 2**bits, (5, 3, n), generator=gen)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, 3, packed_bytes(n, bits)) == (5, 3, (n * bits + 7) // 8)
    assert torch.equal(unpack_indices(packed, bits, n), idx)


def test_bit_order_is_lsb_first():
    # indices 1, 2, 3 at 3 bits: bits 100 010 110 ... -> byte0 = 0b11_010_001, byte1 = 0b0
    packed = pack_indices(torch.tensor([1, 2, 3]), 3)
    assert packed.tolist() == [0b11010001, 0b0]


def test_signs():
    x = torch.tensor([[0.5, -1.0, 0.0, -0.0, 2.0, -3.0, 1.0, -1.0, 4.0]])
    packed = pack_signs(x)
    assert packed.shape == (1, 2)
    assert unpack_signs(packed, 9).tolist() == [[1, -1, 1, 1, 1, -1, 1, -1, 1]]


def test_wrong_packed_width():
    with pytest.raises(ValueError, match="bytes per row"):
        unpack_indices(torch.zeros(2, 7, dtype=torch.uint8), 3, 64)


@pytest.mark.parametrize("bits", range(1, 8))
def test_fast_path_matches_bit_stream(bits):
    """Rows of a multiple of 8 take the word-at-a-time path; both give the same bytes."""
    idx = torch.randint(0, 2**bits, (4, 17), generator=torch.Generator().manual_seed(bits))
    slow = pack_indices(idx, bits)  # 17 indices: the bit-stream path
    fast = pack_indices(idx[:, :16], bits)
    assert torch.equal(slow[:, : 2 * bits], fast)


@pytest.mark.parametrize("bits", range(1, 9))
def test_chunk_table_decodes_like_unpack(bits):
    from tq_vllm.record.packing import chunk_table, unpack_chunks

    idx = torch.randint(0, 2**bits, (3, 5, 64), generator=torch.Generator().manual_seed(bits))
    values = torch.randn(2**bits)
    packed = pack_indices(idx, bits)
    decoded = chunk_table(values, bits)[unpack_chunks(packed, bits)].reshape(3, 5, 64)
    assert torch.equal(decoded, values[idx])
