"""The Triton decode kernel against decode_attention_reference (Triton interpreter here).

Tolerance: atol = rtol = 2e-3 in float32. The kernel feeds its dots fp16 operands (rotated
query, centroids, signs, p * value norm) with fp32 accumulation; the reference is fp32.
"""

import pytest
import torch
from cases import make_cache, run_kernel, strided_view

from tq_vllm.kernels.decode import triton_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.decode.triton_decode import decode_attention
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

TOL = dict(atol=2e-3, rtol=2e-3)


# A covering set over head_dim x key bits (1..8) x value bits x mode x block size x GQA ratio,
# with lengths 1, one block, one past a block and several blocks, and splits that leave some
# programs empty.
CASES = [
    # d, key_bits, mode, value_bits, block_size, hq, hk, lens, num_splits
    (64, 2, "mse", 2, 16, 3, 1, [1, 16, 17, 40], None),
    (64, 3, "prod", 4, 32, 8, 1, [32, 33], 4),
    (64, 8, "mse", 3, 16, 2, 2, [5, 50], 1),
    (128, 4, "prod", 3, 16, 16, 2, [17, 1], 3),
    (128, 3, "mse", 8, 32, 3, 3, [64, 1, 31], 2),
    (128, 1, "prod", 2, 16, 1, 1, [16, 100], 8),
    (128, 1, "mse", 4, 32, 8, 1, [33], None),
    (256, 3, "prod", 2, 32, 3, 1, [1, 32, 65], 2),
    (256, 4, "mse", 1, 16, 8, 1, [16, 17], None),
    (256, 2, "prod", 3, 16, 2, 2, [40], 16),
    (64, 5, "mse", 6, 16, 2, 2, [19, 3], 2),
    (128, 7, "prod", 7, 32, 4, 1, [45], 2),
]


@pytest.mark.parametrize("d,key_bits,mode,value_bits,block_size,hq,hk,lens,num_splits", CASES)
def test_decode_matches_reference(
    d, key_bits, mode, value_bits, block_size, hq, hk, lens, num_splits
):
    codec = LayerCodec(RecordLayout(d, key_bits, mode, value_bits), seed=d + key_bits)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=1)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = d**-0.5
    out = run_kernel(
        decode_attention, query, cache, table, seq_lens, codec, scale, num_splits=num_splits
    )
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TOL)


def test_decode_bf16_query_padded_records_and_tiles():
    codec = LayerCodec(RecordLayout(128, 3, "prod", 3).padded(110), seed=0)
    lens = [70, 2]
    cache, table, _, _ = make_cache(codec, lens, 16, 2, seed=3)
    query = torch.randn(2, 4, 128).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    ref = decode_attention_reference(query.float(), cache, table, seq_lens, codec, 0.1)
    out = run_kernel(
        decode_attention, query, cache, table, seq_lens, codec, 0.1, num_splits=3, block_n=64
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)  # bf16 output rounding


def test_decode_argument_errors():
    codec = LayerCodec(RecordLayout(64, 3, "mse", 3), seed=0)
    cache, table, _, _ = make_cache(codec, [3], 16, 2, seed=0)
    q = torch.randn(1, 4, 64)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="query"):
        decode_attention(q.to(torch.int32), cache, table, lens, codec, 0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(torch.randn(1, 3, 64), cache, table, lens, codec, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        decode_attention(q, cache, table.float(), lens, codec, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q, cache, table, torch.tensor([3, 4], dtype=torch.int32), codec, 0.1)
    with pytest.raises(ValueError, match="kv_cache"):
        decode_attention(q, cache[:, :, :, :10], table, lens, codec, 0.1)
    with pytest.raises(ValueError, match="block_n"):
        decode_attention(q, cache, table, lens, codec, 0.1, block_n=24)


def test_split_count_follows_the_batch_lengths(monkeypatch):
    """The splits come from the batch's longest sequence (max_seq_len, on the host), not from
    the block table's width (max_model_len): short sequences in a wide table take one split,
    which needs no reduce kernel."""
    codec = LayerCodec(RecordLayout(64, 4, "mse", 4), seed=0)
    cache, table, _, _ = make_cache(codec, [40, 7], 16, 1, seed=0)
    wide = torch.zeros(2, 256, dtype=torch.int32)  # 4,096 tokens of table per sequence
    wide[:, : table.shape[1]] = table
    query = torch.randn(2, 2, 64)
    lens = torch.tensor([40, 7], dtype=torch.int32)
    ref = decode_attention_reference(query, cache, wide, lens, codec, 0.1)
    assert triton_decode.default_num_splits(2, 1, 4096, torch.device("cpu")) > 1

    def no_reduce(*args, **kwargs):
        raise AssertionError("one split per row needs no reduce")

    monkeypatch.setattr(triton_decode, "_decode_reduce_kernel", no_reduce)
    out = run_kernel(decode_attention, query, cache, wide, lens, codec, 0.1, max_seq_len=40)
    torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "d,key_bits,mode,value_bits,block_size,hq,hk,lens", [c[:-1] for c in CASES[::4]]
)
def test_decode_log_sum_exp_matches_reference(
    d, key_bits, mode, value_bits, block_size, hq, hk, lens, num_splits
):
    """lse_out (natural log, as the exact window merges it) against the reference's, with a
    row of 0 tokens: -inf and an output of 0. One split writes it from the split kernel, more
    from the reduce kernel."""
    codec = LayerCodec(RecordLayout(d, key_bits, mode, value_bits), seed=d + key_bits)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=1)
    seq_lens = torch.tensor([*lens, 0], dtype=torch.int32)
    table = torch.cat([table, table[:1]])
    query = torch.randn(len(seq_lens), hq, d, generator=torch.Generator().manual_seed(2))
    lse, ref_lse = (torch.full((len(seq_lens), hq), float("nan")) for _ in range(2))
    out = run_kernel(
        decode_attention, query, cache, table, seq_lens, codec, d**-0.5, num_splits=num_splits,
        lse_out=lse,
    )  # fmt: skip
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, d**-0.5, lse_out=ref_lse)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse, **TOL)
    assert torch.all(lse[-1] == float("-inf")) and torch.all(out[-1] == 0)


# The default's 5-bit values, block sizes up to 128, and sequences of 0 tokens (padding rows of
# a batch: they attend to nothing and read 0) and 1 token.
@pytest.mark.parametrize(
    "d,key_bits,value_bits,block_size,hq,hk,lens",
    [(64, 6, 5, 64, 9, 3, [0, 1, 130]), (128, 4, 5, 128, 8, 2, [1, 0, 257])],
)
def test_decode_served_shapes(d, key_bits, value_bits, block_size, hq, hk, lens):
    codec = LayerCodec(RecordLayout(d, key_bits, "mse", value_bits), seed=d)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=11)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(12))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, 0.1)
    assert torch.equal(ref[seq_lens == 0], torch.zeros_like(ref[seq_lens == 0]))
    for num_splits in (1, 3):
        out = run_kernel(
            decode_attention, query, cache, table, seq_lens, codec, 0.1, num_splits=num_splits
        )
        torch.testing.assert_close(out, ref, **TOL)


@pytest.mark.parametrize("bits,codebook", [(6, "memory"), (4, "registers")])
def test_decode_reads_a_strided_cache_view(bits, codebook):
    """A hybrid model's layers get strided views of a shared buffer (kernels take strides).
    Records 5 bytes apart are not 4-byte aligned: the register codebook reads bytes there."""
    codec = LayerCodec(RecordLayout(64, bits, "mse", bits - 1), seed=0)
    cache, table, _, _ = make_cache(codec, [40, 7], 16, 3, seed=0)
    view, _ = strided_view(cache)
    query = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    lens = torch.tensor([40, 7], dtype=torch.int32)
    ref = decode_attention_reference(query, cache, table, lens, codec, 0.1)
    out = run_kernel(decode_attention, query, view, table, lens, codec, 0.1, codebook=codebook)
    torch.testing.assert_close(out, ref, **TOL)
