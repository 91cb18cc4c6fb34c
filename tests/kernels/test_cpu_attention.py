"""The C++ attention (decode, fused context) and the dense prefill path against the PyTorch
references.

Tolerance: atol = 1e-5, rtol = 1e-4. Both sides compute in float32 from the same codes; they
differ only in summation order and the kernel's exp (a polynomial, relative error < 1e-7),
which moves outputs by ~1e-6. Caches are 0xFF-filled (NaN norms) wherever nothing was stored
and unused block-table entries point at such a block, so a read past a sequence shows as NaN.
Head dims that are multiples of 16 take the AVX-512 path on CPUs that have it, the others
(40, 20: not even a whole byte group) the portable one.
"""

import logging

import pytest
import torch
from cases import (
    CPU_TOL,
    DENSE_TOL,
    dense_kernel_calls,
    make_cache,
    split_codec,
    strided_view,
)

from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.kernels.context import cpu_context, dense
from tq_vllm.kernels.context.reference import context_attention_reference, gather_context
from tq_vllm.kernels.decode import cpu_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout
from tq_vllm.record.packing import chunk_table

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test, once per runnable C++ build


# Every key width in both modes, every value width, head dims 16 * k and others, block sizes
# 16/32, GQA ratios 1/3/8, lengths 1, a block, a block + 1, several blocks.
CASES = [
    # d, key_bits, mode, value_bits, block_size, hq, hk, lens
    (64, 1, "mse", 1, 16, 3, 1, [1, 16, 17, 40]),
    (128, 2, "mse", 2, 32, 8, 1, [32, 33]),
    (96, 3, "mse", 3, 16, 2, 2, [5, 50]),
    (256, 4, "mse", 4, 16, 8, 1, [17, 1]),
    (64, 5, "mse", 5, 32, 3, 3, [64, 1, 31]),
    (64, 6, "mse", 4, 16, 9, 3, [100, 16]),
    (128, 7, "mse", 7, 16, 3, 1, [45]),
    (40, 8, "mse", 8, 16, 3, 1, [33, 2]),
    (64, 1, "prod", 2, 16, 1, 1, [16, 100]),
    (96, 2, "prod", 6, 32, 3, 1, [33]),
    (128, 3, "prod", 4, 16, 8, 2, [1, 32, 65]),
    (256, 4, "prod", 3, 32, 3, 1, [40]),
    (20, 5, "prod", 5, 16, 2, 2, [19, 3]),
    (128, 6, "prod", 1, 16, 8, 1, [16, 17]),
    (64, 7, "prod", 8, 32, 1, 1, [70]),
    (40, 8, "prod", 7, 16, 3, 3, [48, 1]),
]


def setup(d, key_bits, mode, value_bits, block_size, hk, lens, seed=1):
    codec = LayerCodec(RecordLayout(d, key_bits, mode, value_bits), seed=d + key_bits)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=seed)
    return codec, cache, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("d,key_bits,mode,value_bits,block_size,hq,hk,lens", CASES)
def test_decode_matches_reference(
    d, key_bits, mode, value_bits, block_size, hq, hk, lens, num_splits
):
    codec, cache, table, seq_lens = setup(d, key_bits, mode, value_bits, block_size, hk, lens)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2))
    out = cpu_decode.decode_attention(
        query, cache, table, seq_lens, codec, d**-0.5, num_splits=num_splits
    )
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, d**-0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **CPU_TOL)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("d,key_bits,mode,value_bits,block_size,hq,hk,lens", CASES[::3])
def test_decode_log_sum_exp_matches_reference(
    d, key_bits, mode, value_bits, block_size, hq, hk, lens, num_splits
):
    """lse_out: each row's log-sum-exp of its scaled scores over the dequantized keys (the
    softmax's normalizer, which merges this attention with one over other tokens); -inf for a
    row that reads nothing (a padding row of length 0), whose output is 0."""
    codec, cache, table, seq_lens = setup(d, key_bits, mode, value_bits, block_size, hk, lens)
    seq_lens = torch.cat([seq_lens, torch.zeros(1, dtype=torch.int32)])
    table = torch.cat([table, table[:1]])
    query = torch.randn(len(seq_lens), hq, d, generator=torch.Generator().manual_seed(2))
    lse = torch.full((len(seq_lens), hq), float("nan"))
    out = cpu_decode.decode_attention(
        query, cache, table, seq_lens, codec, d**-0.5, num_splits=num_splits, lse_out=lse
    )
    ref_lse = torch.empty_like(lse)  # the reference's lse_out, which the Triton test uses
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, d**-0.5, lse_out=ref_lse)
    torch.testing.assert_close(out, ref, **CPU_TOL)
    torch.testing.assert_close(lse, ref_lse, **CPU_TOL)
    q = codec.rotate_queries(query) * d**-0.5
    for b, n in enumerate(lens):
        k, _ = gather_context(cache, table[b], n, codec)  # [Hk, n, d]
        scores = torch.einsum("hgd,hnd->hgn", q[b].view(hk, hq // hk, d), k)
        torch.testing.assert_close(lse[b], scores.logsumexp(-1).flatten(), **CPU_TOL)
    assert torch.all(lse[-1] == float("-inf")) and torch.all(out[-1] == 0)


@pytest.mark.parametrize("d,key_bits,mode,value_bits,block_size,hq,hk,lens", CASES)
def test_context_matches_reference(d, key_bits, mode, value_bits, block_size, hq, hk, lens):
    codec, cache, table, seq_lens = setup(d, key_bits, mode, value_bits, block_size, hk, lens)
    # Chunks of every shape: the whole sequence, one row, a part after some context, and a
    # sequence with no rows at all in this step.
    q_lens = [[n, 1, max(1, n // 3), 0][b % 4] for b, n in enumerate(lens)]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), hq, d, generator=torch.Generator().manual_seed(3))
    args = (cache, table, starts, seq_lens, codec, d**-0.5)
    out = cpu_context.context_attention(query, *args)
    ref = context_attention_reference(query, None, None, *args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **CPU_TOL)


def test_context_long_chunk_and_splits():
    """Row tiles of a long chunk after a long context, forced context splits."""
    codec, cache, table, seq_lens = setup(64, 4, "mse", 3, 16, 3, [300, 90], seed=4)
    starts = torch.tensor([0, 70, 160], dtype=torch.int32)
    query = torch.randn(160, 9, 64, generator=torch.Generator().manual_seed(5))
    args = (cache, table, starts, seq_lens, codec, 0.125)
    ref = context_attention_reference(query, None, None, *args)
    for num_splits in (1, 4):
        out = cpu_context.context_attention(query, *args, num_splits=num_splits)
        torch.testing.assert_close(out, ref, **CPU_TOL)


# -- the dense path: 16-bit queries with at least DENSE_ROWS new rows ------------------------
# Keys and values are dequantized once (exactly the reference's float32 values, rounded once to
# the query's dtype) and SDPA attends over them. Against the float32 reference the output then
# differs by the 16-bit rounding of q, k, v and the output: atol/rtol 3e-2 for bf16 (8-bit
# significand), 4e-3 for fp16.


def cpp_dequantize(codec, cache, block_row, length, dtype, value_centroids=None):
    """The C++ dequantize of one sequence's first `length` tokens, as the records hold them."""
    if value_centroids is None:
        value_centroids = codec.value.centroids.float()
    return cpu_extension.ops().dequantize(
        cache,
        block_row,
        length,
        codec.key.centroids.float(),
        value_centroids,
        cpu_extension.layout_fields(codec),
        codec.layout.head_dim,
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 40])
def test_dequantize_matches_reference_values(d, dtype):
    codec, cache, table, _ = setup(d, 5, "mse", 3, 16, 3, [50])
    got_k, got_v = cpp_dequantize(codec, cache, table[0], 50, dtype)
    ref_k, ref_v = gather_context(cache, table[0], 50, codec)
    assert got_k.dtype == dtype and torch.equal(got_k, ref_k.to(dtype))
    assert torch.equal(got_v, ref_v.to(dtype))


@pytest.mark.parametrize("codebook", ["served", "asymmetric"])
@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("d", [64, 48])
def test_dequantize_5_6_bits_any_codebook(d, bits, codebook):
    """The C++ lookups fold a symmetric codebook (c[2^b - 1 - i] = -c[i], as Lloyd-Max's
    are) to its lower half at 5-6 bits; any other codebook must take the whole table. On AVX2
    head dim 48 (not a multiple of 32) takes the vpermps blend tree, 64 the lookup timed
    fastest on this CPU (byte planes on Zen 3 and 4); exact either way."""
    codec, cache, table, _ = setup(d, bits, "mse", bits, 16, 3, [50])
    for part in (codec.key, codec.value):  # bit for bit, or the fold is never taken
        assert torch.equal(part.centroids.flip(0), -part.centroids)
    if codebook == "asymmetric":
        for part in (codec.key, codec.value):  # the reference decodes by its chunk table
            part.centroids = part.centroids + 1e-3 * torch.arange(len(part.centroids))
            part._chunk_table = chunk_table(part.centroids, bits)
    got_k, got_v = cpp_dequantize(codec, cache, table[0], 50, torch.float32)
    ref_k, ref_v = gather_context(cache, table[0], 50, codec)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)


# d, key bits, value bits, block size, hq, hk
DENSE_CASES = [
    (64, 6, 4, 16, 9, 3),
    (128, 3, 3, 32, 8, 2),
    (40, 4, 2, 16, 4, 4),
    (256, 2, 5, 16, 2, 1),
]


@pytest.mark.parametrize("attend", ["vllm", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,key_bits,value_bits,block_size,hq,hk", DENSE_CASES)
def test_dense_context_matches_reference(
    d, key_bits, value_bits, block_size, hq, hk, dtype, attend, monkeypatch
):
    """attend: vLLM's CPU attention kernel where it runs (head_dim 40 is not among its sizes:
    SDPA then), or SDPA forced."""
    lens = [70, 40, 33, 90, 5]
    codec, cache, table, seq_lens = setup(d, key_bits, "mse", value_bits, block_size, hk, lens)
    # Dense: a whole sequence (plain causal), a chunk after context (masked), exactly
    # DENSE_ROWS rows; fused in the same call: 15 rows, one row, and none.
    q_lens = [70, 20, cpu_context.DENSE_ROWS, 15, 1]
    taken = []
    dense_attention = dense.dense_attention
    monkeypatch.setattr(
        cpu_context,
        "dense_attention",
        lambda q, cache, table, seqs, *a: (
            taken.append(seqs) or dense_attention(q, cache, table, seqs, *a)
        ),
    )
    kernel = dense_kernel_calls(monkeypatch, attend)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), hq, d, generator=torch.Generator().manual_seed(7))
    args = (cache, table, starts, seq_lens, codec, d**-0.5)
    out = cpu_context.context_attention(query.to(dtype), *args)
    ref = context_attention_reference(query, None, None, *args)
    assert taken == [[0, 1, 2]] and len(kernel) == 1
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[dtype])


def test_vllm_kernel_runs_for_the_embedded_model_shape():
    """bf16, head_dim 64: the shape the embedded model serves with must not fall back to SDPA."""
    q = torch.randn(8, 9, 64).bfloat16()
    kv = [torch.randn(3, 20, 64).bfloat16()]
    out = dense.vllm_cpu_attention(q, kv, kv, [8], 0.125)
    assert out is not None and out.shape == q.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_vllm_kernel_over_uninitialised_pages_and_into_out(dtype, monkeypatch):
    """The temporary paged cache is not zeroed as a whole: with every torch.empty NaN-filled,
    sequences that end inside a block (5, 130 tokens; 256 ends on one) and rows that are not a
    sequence's whole (the last 3 of 130) still match SDPA; out= is written in place, and an
    out the kernel cannot write gets a clear error."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    torch.manual_seed(0)
    lens, q_lens = [5, 130, 256], [5, 3, 256]
    keys = [torch.randn(3, n, 64).to(dtype) for n in lens]
    values = [torch.randn(3, n, 64).to(dtype) for n in lens]
    query = torch.randn(sum(q_lens), 9, 64).to(dtype)
    out = torch.full_like(query, float("nan"))
    got = dense.vllm_cpu_attention(query, keys, values, q_lens, 0.125, out=out)
    assert got is out and torch.isfinite(out).all()
    parts = zip(query.split(q_lens), keys, values)
    ref = torch.cat([dense._sdpa(q.float(), k.float(), v.float(), 0.125) for q, k, v in parts])
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[dtype])
    with pytest.raises(ValueError, match="attention output must be contiguous"):
        dense.vllm_cpu_attention(query, keys, values, q_lens, 0.125, out=out[:, :, :32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uniform_values_context_matches_reference(dtype):
    """value_mode 'uniform' (the upstream emulation) has no fused kernel: 16-bit chunks of
    DENSE_ROWS or more take the dense path, whose dequantized values (zero + scale * idx,
    unrotated) are exactly the reference's in float32; the rest runs the reference."""
    layout = RecordLayout(64, 4, "mse", 3, value_mode="uniform")
    codec = LayerCodec(layout, seed=1)
    lens = [60, 30, 7]
    cache, table, _, _ = make_cache(codec, lens, 16, 3, seed=2)
    got_k, got_v = cpp_dequantize(
        codec, cache, table[0], 60, torch.float32, torch.arange(8, dtype=torch.float32)
    )
    ref_k, ref_v = gather_context(cache, table[0], 60, codec)  # values rotated
    assert torch.equal(got_k, ref_k)
    torch.testing.assert_close(codec.rotate(got_v), ref_v, atol=1e-5, rtol=1e-5)
    starts = torch.tensor([0, 60, 80, 83], dtype=torch.int32)  # dense, dense, reference
    query = torch.randn(83, 9, 64, generator=torch.Generator().manual_seed(4))
    args = (cache, table, starts, torch.tensor(lens, dtype=torch.int32), codec, 0.125)
    out = dispatch.context_attention(query.to(dtype), None, None, *args)
    ref = context_attention_reference(query, None, None, *args)
    tol = DENSE_TOL[dtype] if dtype in DENSE_TOL else CPU_TOL
    torch.testing.assert_close(out.float(), ref, **tol)


def test_dense_path_not_for_prod_keys(monkeypatch):
    monkeypatch.setattr(cpu_context, "dense_attention", None)  # calling it would fail
    for mode, dtype in (("prod", torch.float32), ("prod", torch.bfloat16)):
        codec, cache, table, seq_lens = setup(64, 3, mode, 3, 16, 1, [40])
        starts = torch.tensor([0, 40], dtype=torch.int32)
        query = torch.randn(40, 2, 64).to(dtype)
        cpu_context.context_attention(query, cache, table, starts, seq_lens, codec, 0.1)


def test_bf16_query_padded_records_int64_tables():
    codec = LayerCodec(RecordLayout(128, 3, "prod", 3).padded(110), seed=0)
    lens = [70, 2]
    cache, table, _, _ = make_cache(codec, lens, 16, 2, seed=3)
    query = torch.randn(2, 4, 128).to(torch.bfloat16)
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    out = cpu_decode.decode_attention(query, cache, table.long(), seq_lens, codec, 0.1)
    ref = decode_attention_reference(query.float(), cache, table, seq_lens, codec, 0.1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)  # bf16 output rounding


def test_ops_dispatches_cpu_tensors_to_the_kernel():
    codec, cache, table, seq_lens = setup(64, 3, "mse", 3, 16, 1, [20, 5])
    query = torch.randn(2, 3, 64)
    kernel = cpu_decode.decode_attention(query, cache, table, seq_lens, codec, 0.1)
    assert torch.equal(dispatch.decode_attention(query, cache, table, seq_lens, codec, 0.1), kernel)
    starts = torch.tensor([0, 4, 6], dtype=torch.int32)
    query = torch.randn(6, 3, 64)
    args = (cache, table, starts, seq_lens, codec, 0.1)
    kernel = cpu_context.context_attention(query, *args)
    assert torch.equal(dispatch.context_attention(query, None, None, *args), kernel)


def test_argument_errors():
    codec, cache, table, seq_lens = setup(64, 3, "mse", 3, 16, 2, [3])
    q = torch.randn(1, 4, 64)
    with pytest.raises(ValueError, match="query"):
        cpu_decode.decode_attention(q.to(torch.int32), cache, table, seq_lens, codec, 0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        cpu_decode.decode_attention(torch.randn(1, 3, 64), cache, table, seq_lens, codec, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        cpu_decode.decode_attention(q, cache, table.float(), seq_lens, codec, 0.1)
    with pytest.raises(ValueError, match="for 2 sequences"):
        cpu_decode.decode_attention(q, cache, table, torch.tensor([3, 4]), codec, 0.1)
    with pytest.raises(ValueError, match="kv_cache"):
        cpu_decode.decode_attention(q, cache[:, :, :, :10], table, seq_lens, codec, 0.1)
    with pytest.raises(ValueError, match="query_start_loc"):
        cpu_context.context_attention(q, cache, table, torch.tensor([0]), seq_lens, codec, 0.1)
    with pytest.raises(RuntimeError, match="more blocks than block_table"):
        cpu_decode.decode_attention(q, cache, table[:, :0], seq_lens, codec, 0.1)


def test_changed_vllm_ops_fall_back_to_sdpa_with_a_reason(monkeypatch, caplog):
    """vLLM's CPU attention ops are internals: one whose signature changed must not fail the
    forward pass; the dense path logs why and attends with SDPA."""
    import vllm._custom_ops as ops

    def changed(query, key_cache):  # another signature than the one dense.py calls
        raise AssertionError("not reached")

    monkeypatch.setattr(ops, "cpu_attention_with_kv_cache", changed)
    monkeypatch.setattr(dense, "_unusable", [])
    codec, cache, table, seq_lens = setup(64, 6, "mse", 5, 16, 3, [40])
    starts = torch.tensor([0, 40], dtype=torch.int32)
    query = torch.randn(40, 9, 64, generator=torch.Generator().manual_seed(3))
    args = (cache, table, starts, seq_lens, codec, 0.125)
    with caplog.at_level(logging.WARNING, logger="tq_vllm"):
        out = cpu_context.context_attention(query.bfloat16(), *args)
        again = cpu_context.context_attention(query.bfloat16(), *args)
    ref = context_attention_reference(query, None, None, *args)
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[torch.bfloat16])
    assert torch.equal(out, again)
    assert caplog.text.count("vLLM's CPU attention ops failed (TypeError") == 1


def test_decode_of_empty_and_one_token_sequences():
    """Padding rows of 0 tokens read 0 (as the reference and the Triton kernel), one token
    attends to itself."""
    codec, cache, table, seq_lens = setup(64, 6, "mse", 5, 128, 3, [0, 1, 130])
    query = torch.randn(3, 9, 64, generator=torch.Generator().manual_seed(5))
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, 0.125)
    out = cpu_decode.decode_attention(query, cache, table, seq_lens, codec, 0.125)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ref, **CPU_TOL)


@pytest.mark.parametrize("path", ["cpu", "reference"])
def test_decode_partial_in_float32_for_a_bf16_query(path, monkeypatch):
    """out_dtype float32 (the exact window's compressed partial, merged next): a bf16 query's
    result comes back as the op's float32 sums, not rounded to bf16 first; without it, in the
    query's dtype. The reference path converts its result the same way."""
    monkeypatch.setattr(dispatch, "REFERENCE_ONLY", path == "reference")
    # The float32 dots, whose sums match the reference's (test_cpu_bf16_dots.py: the bf16 ones).
    monkeypatch.setattr(cpu_decode, "BF16_DOTS", False)
    codec, cache, table, seq_lens = setup(64, 5, "mse", 3, 16, 3, [70, 9])
    query = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    args = (query, cache, table, seq_lens, codec, 0.125)
    partial = dispatch.decode_attention(*args, out_dtype=torch.float32)
    rounded = dispatch.decode_attention(*args)
    assert partial.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    ref = decode_attention_reference(query.float(), cache, table, seq_lens, codec, 0.125)
    if path == "cpu":  # the float32 query the op computes with: the reference's result
        torch.testing.assert_close(partial, ref, **CPU_TOL)
        assert not torch.equal(partial, partial.bfloat16().float())  # not rounded on the way
    assert torch.equal(rounded, partial.bfloat16())


@pytest.mark.parametrize("d", [64, 96, 128])  # a Hadamard exact in bf16, a QR rotation, neither
@pytest.mark.parametrize("split", [False, True])
def test_dense_rotations_match_the_float32_products(d, split, monkeypatch):
    """dense.rotated (the dense paths' rotations: for bf16, one bf16 product, with the matrix
    split in two where bf16 does not hold it) against the codec's float32 products rounded to
    bf16: equal but near rounding ties, in under 1% of values (0.25% at d 96, none at 64 but
    for split keys, whose parts' rotations bf16 does not hold), and
    then one ulp apart plus the split's own error, 2^-17 of the vector's norm (which shows at
    values near 0); the matrix's bf16 rounding alone puts 4x more values off. Forced on CPUs
    without bf16 dot products too (slower there, the same numbers); float32 takes the codec's
    product."""
    monkeypatch.setattr(dense, "_bf16_products", lambda: True)
    codec = split_codec(d=d, hk=2) if split else LayerCodec(RecordLayout(d, 5, "mse", 3), seed=3)
    # Four rows a token for two KV heads: a split key's queries are rotated per GQA group.
    x = torch.randn(2000, 4, d, generator=torch.Generator().manual_seed(7)).bfloat16()
    products = {"keys": codec.rotate_queries, "values": codec.rotate, "back": codec.unrotate}
    for name, product in products.items():
        back = name == "back"
        got = dense.rotated(x, codec, back=back, values=name == "values")
        want = product(x).bfloat16()
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        differ = got != want
        assert differ.float().mean() < 0.01, name
        bound = want.float().abs() * 2.0**-7 + x.float().norm(dim=-1, keepdim=True) * 2.0**-17
        assert ((got.float() - want.float()).abs() <= bound)[differ].all(), name
        if split and name == "keys":  # split keys: a rotation M_h per KV head
            heads = x.view(2000, 2, 2, d)
            plain = torch.einsum("thgd,hed->thge", heads, codec.key.rotation.bfloat16())
            rounded = plain.reshape(x.shape) != want  # the matrices rounded to bf16, not split
        else:
            matrix = codec.rotation if back else codec.rotation.T
            rounded = (x @ matrix.bfloat16()) != want  # the matrix rounded to bf16, not split
        assert d == 64 or differ.sum() < rounded.sum() / 4, name
    f32 = x.float()
    assert torch.equal(dense.rotated(f32, codec), codec.rotate_queries(f32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dense_rotations_of_strided_rows(dtype):
    """Queries and keys arrive as strided views of the fused qkv projection: rotated multiplies
    their rows as one 2-d matrix (rotation.rows_times; x @ M ran a batched product per token)
    and gives them the numbers it gives a contiguous copy."""
    codec = LayerCodec(RecordLayout(64, 5, "mse", 3), seed=3)
    qkv = torch.randn(300, 15 * 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    query = qkv[:, : 9 * 64].view(300, 9, 64)
    assert not query.is_contiguous()
    for back, values in ((False, False), (False, True), (True, False)):
        with torch.profiler.profile() as prof:
            got = dense.rotated(query, codec, back=back, values=values)
        assert "aten::bmm" not in {event.name for event in prof.events()}  # one 2-d product
        assert got.shape == query.shape and got.dtype == dtype
        assert torch.equal(got, dense.rotated(query.contiguous(), codec, back=back, values=values))


def test_strided_cache_views():
    """A hybrid model's layers get strided views of a shared buffer: decode, fused and dense
    context read them as they read a contiguous cache."""
    codec, cache, table, seq_lens = setup(64, 6, "mse", 5, 16, 3, [40, 70])
    view, _ = strided_view(cache)
    assert not view.is_contiguous()
    query = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(6))
    ref = cpu_decode.decode_attention(query, cache, table, seq_lens, codec, 0.125)
    assert torch.equal(cpu_decode.decode_attention(query, view, table, seq_lens, codec, 0.125), ref)
    starts = torch.tensor([0, 3, 23], dtype=torch.int32)  # a fused chunk and a dense one
    rows = torch.randn(23, 9, 64, generator=torch.Generator().manual_seed(7)).bfloat16()
    ref = cpu_context.context_attention(rows, cache, table, starts, seq_lens, codec, 0.125)
    out = cpu_context.context_attention(rows, view, table, starts, seq_lens, codec, 0.125)
    assert torch.equal(out, ref)
