"""The register codebook (kernels/register_codebook.py) and the decode kernel that uses it.

In the interpreter the byte permute is emulated_prmt; test_emulated_prmt_is_ptx_prmt holds it
to PTX's definition of prmt.b32 (default mode), and on a GPU (TRITON_INTERPRET=0) the same
tests run the real instruction. The decode kernel must give the memory codebook's results
bit for bit: both look up the same float16 centroids and feed the same dots.
"""

import pytest
import torch
import triton
import triton.language as tl
from cases import make_cache, run_kernel

from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.decode.triton_decode import decode_attention
from tq_vllm.kernels.register_codebook import (
    EMULATED,
    load_register_table,
    prmt,
    register_lookup8,
    register_table,
)
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout
from tq_vllm.record.packing import pack_indices


@triton.jit
def _prmt_kernel(a_ptr, b_ptr, sel_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i).to(tl.uint32, bitcast=True)
    b = tl.load(b_ptr + i).to(tl.uint32, bitcast=True)
    sel = tl.load(sel_ptr + i).to(tl.uint32, bitcast=True)
    tl.store(out_ptr + i, prmt(a, b, sel, EMULATED).to(tl.int32, bitcast=True))


def ptx_prmt(a: int, b: int, sel: int) -> int:
    """PTX ISA, prmt.b32 default mode: bytes 0-3 of a and 4-7 of b; result byte k is the
    byte numbered by selector nibble k, its sign replicated when the nibble's bit 3 is set."""
    source = (b << 32) | a
    out = 0
    for k in range(4):
        nibble = (sel >> (4 * k)) & 0xF
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * k)
    return out


def test_emulated_prmt_is_ptx_prmt():
    gen = torch.Generator().manual_seed(0)
    n = 256
    a, b = (torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64) for _ in "ab")
    sel = torch.randint(0, 2**31, (n,), generator=gen, dtype=torch.int64) & 0x77777777
    out = torch.empty(n, dtype=torch.int32)
    args = [x.to(torch.int32) for x in (a, b, sel)]
    run_kernel(_prmt_kernel[(1,)], *args, out, N=n)
    for i in range(n):
        want = ptx_prmt(a[i].item() & 0xFFFFFFFF, b[i].item() & 0xFFFFFFFF, sel[i].item())
        assert out[i].item() & 0xFFFFFFFF == want, (i, hex(want))


@triton.jit
def _lookup_kernel(packed_ptr, table_ptr, out_ptr, BITS: tl.constexpr, GROUPS: tl.constexpr):
    g = tl.arange(0, GROUPS)
    lo = tl.zeros([GROUPS], dtype=tl.uint32)
    for k in tl.static_range(BITS):
        lo |= tl.load(packed_ptr + g * BITS + k).to(tl.uint32) << (8 * k)
    p0, p1, p2, p3 = register_lookup8(lo, load_register_table(table_ptr), BITS, EMULATED)
    tl.store(out_ptr + g * 4, p0.to(tl.int32, bitcast=True))
    tl.store(out_ptr + g * 4 + 1, p1.to(tl.int32, bitcast=True))
    tl.store(out_ptr + g * 4 + 2, p2.to(tl.int32, bitcast=True))
    tl.store(out_ptr + g * 4 + 3, p3.to(tl.int32, bitcast=True))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_register_lookup_gives_the_centroids(bits):
    """Every index of every width through nibbles and the two-table merge (bit 3)."""
    gen = torch.Generator().manual_seed(bits)
    centroids = torch.randn(1 << bits, generator=gen)
    groups = 64
    idx = torch.randint(0, 1 << bits, (groups * 8,), generator=gen)
    idx[: 1 << bits] = torch.arange(1 << bits)  # each entry at least once
    packed = pack_indices(idx, bits)
    out = torch.empty(groups * 4, dtype=torch.int32)
    table = register_table(centroids)
    run_kernel(_lookup_kernel[(1,)], packed, table, out, BITS=bits, GROUPS=groups)
    got = out.view(torch.float16)  # little-endian: each word's low half first
    torch.testing.assert_close(got, centroids.to(torch.float16)[idx], rtol=0, atol=0)


def test_register_table_refuses_a_large_codebook():
    with pytest.raises(ValueError, match="at most 16"):
        register_table(torch.zeros(32))


# d, key_bits, mode, value_bits, outliers, block_size, hq, hk, lens, num_splits: 4-bit
# fields with whole-word groups (mse records are 4-byte aligned at these sizes), widths 1-3,
# the memory route kept for 5+ bits, prod signs (records not aligned), split keys.
CASES = [
    (128, 4, "mse", 4, 0, 16, 8, 2, [1, 16, 17, 70], 3),
    (64, 3, "mse", 2, 0, 32, 4, 1, [33, 5], None),
    (64, 1, "mse", 3, 0, 16, 2, 2, [40], 2),
    (128, 6, "mse", 4, 0, 16, 4, 1, [50, 1], 2),
    (128, 4, "prod", 3, 0, 16, 4, 2, [19, 31], 1),
    (64, 2, "mse", 3, 16, 16, 4, 2, [45, 3], 2),
]


@pytest.mark.parametrize(
    "d,key_bits,mode,value_bits,outliers,block_size,hq,hk,lens,num_splits", CASES
)
def test_register_codebook_decode_equals_memory_codebook(
    d, key_bits, mode, value_bits, outliers, block_size, hq, hk, lens, num_splits
):
    layout = RecordLayout(d, key_bits, mode, value_bits, key_outliers=outliers,
                          key_outlier_bits=4 if outliers else 0)  # fmt: skip
    channels = None
    if outliers:
        gen = torch.Generator().manual_seed(5)
        channels = torch.stack([torch.randperm(d, generator=gen)[:outliers] for _ in range(hk)])
    codec = LayerCodec(layout, seed=d + key_bits, outlier_channels=channels)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=1)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    args = (query, cache, table, seq_lens, codec, d**-0.5)
    memory = run_kernel(decode_attention, *args, num_splits=num_splits, codebook="memory")
    registers = run_kernel(decode_attention, *args, num_splits=num_splits, codebook="registers")
    torch.testing.assert_close(registers, memory, rtol=0, atol=0)
    ref = decode_attention_reference(*args)
    torch.testing.assert_close(registers, ref, atol=2e-3, rtol=2e-3)


def test_decode_refuses_an_unknown_codebook():
    codec = LayerCodec(RecordLayout(64, 4, "mse", 4), seed=0)
    cache, table, _, _ = make_cache(codec, [3], 16, 1, seed=0)
    with pytest.raises(ValueError, match="codebook must be one of"):
        decode_attention(
            torch.randn(1, 1, 64), cache, table, torch.tensor([3]), codec, 0.1, codebook="smem"
        )
