"""Split keys (outlier channels) in the Triton kernels, against the PyTorch references (the
Triton interpreter here; compiled on a GPU with TRITON_INTERPRET=0).

Tolerances as for plain keys: the store's fp16 norms within 1 ulp and indices exact except
within cases.NEAR_BOUNDARY of a bucket boundary, per part; attention at atol = rtol = 2e-3
(fp16 dot operands, fp32 accumulation). Caches are 0xFF-filled (NaN norms) wherever nothing
was stored, so a record read that should not happen poisons the output.
"""

import pytest
import torch
from cases import assert_fp16_close, check_indices, make_cache, run_kernel, split_codec

from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.context.triton_context import context_attention
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.decode.triton_decode import decode_attention
from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.kernels.store.triton_store import store_kv
from tq_vllm.record.layout import decode_records

TOL = dict(atol=2e-3, rtol=2e-3)

# Every Triton head dim; outlier counts that fill whole 8-index groups and ones that do not
# (20 and 40: both parts end inside a group and pad their tiles: 44 -> 64, 20 -> 32); bits
# 1-8 in one part or the other; GQA 1-8; vLLM's CUDA block sizes.
CASES = [
    # d, bits, outlier bits, n, value bits, block size, hq, hk
    (64, 2, 4, 16, 3, 16, 9, 3),
    (64, 3, 5, 20, 4, 32, 4, 1),
    (128, 2, 4, 32, 5, 16, 8, 2),
    (128, 1, 8, 40, 2, 64, 2, 2),
    (256, 3, 6, 64, 4, 16, 8, 1),
    (256, 7, 8, 24, 1, 32, 2, 2),
]


def codec_for(d, bits, outlier_bits, n, value_bits, hk):
    return split_codec(d, bits, outlier_bits, n, value_bits, hk, seed=d + n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_store_writes_split_keys(d, bits, outlier_bits, n, value_bits, block_size, hq, hk, dtype):
    """Both key parts and the value as the reference writes them; padding slots (-1), the
    bytes past each record and unwritten slots untouched; a key with a NaN or inf coordinate
    reads back with both norms 0."""
    codec = codec_for(d, bits, outlier_bits, n, value_bits, hk)
    gen = torch.Generator().manual_seed(d + bits)
    key = (torch.randn(24, hk, d, generator=gen) * 2).to(dtype)
    value = torch.randn(24, hk, d, generator=gen).to(dtype)
    key[3, 0, 5], key[7, hk - 1, 0] = float("nan"), float("inf")
    slots = torch.randperm(4 * block_size, generator=gen)[:24]
    slots[[2, 11]] = -1
    shape = (4, hk, block_size, codec.layout.record_bytes + 3)
    ref = torch.full(shape, 0xFF, dtype=torch.uint8)
    got = ref.clone()
    run_kernel(store_kv, key, value, got, slots, codec)
    store_kv_reference(key, value, ref, slots, codec)

    valid = slots >= 0
    blocks, offsets = slots[valid] // block_size, slots[valid] % block_size
    written = torch.zeros_like(got, dtype=torch.bool)
    written[blocks, :, offsets, : codec.layout.size] = True
    assert torch.equal(got[~written], ref[~written]), "bytes outside the records differ"
    x = key[valid].float().reshape(-1, d)
    finite = x.isfinite().all(-1)
    assert int((~finite).sum()) == 2
    records = [c[blocks, :, offsets].reshape(-1, c.shape[-1]) for c in (got, ref)]
    (got_k, got_v), (ref_k, ref_v) = (decode_records(codec.layout, r) for r in records)
    assert_fp16_close(got_v.norms, ref_v.norms, "value norm")
    check_indices(codec.value, got_v, ref_v, value[valid].float().reshape(-1, d))
    for part in (got_k.regular, got_k.outlier):
        assert bool((part.norms[~finite] == 0).all()), "a non-finite key must read back as 0"
    grouped = x.view(-1, hk, d)
    parts = grouped.gather(-1, codec.key.order.expand(grouped.shape)).reshape(-1, d)
    regular = codec.layout.key_regular_channels
    for name, quantizer, columns in (
        ("regular", codec.key.regular, slice(None, regular)),
        ("outlier", codec.key.outlier, slice(regular, None)),
    ):
        mine, theirs = getattr(got_k, name), getattr(ref_k, name)
        assert_fp16_close(mine.norms, theirs.norms, f"{name} key norm")
        for codes in (mine, theirs):  # the indices of finite keys only: others mean nothing
            codes.indices = codes.indices[finite]
        check_indices(quantizer, mine, theirs, parts[finite][:, columns])


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_decode_reads_split_keys(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk, num_splits
):
    codec = codec_for(d, bits, outlier_bits, n, value_bits, hk)
    lens = [1, block_size, block_size + 1, 3 * block_size - 5]
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=1)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    args = (query, cache, table, seq_lens, codec, d**-0.5)
    out = run_kernel(decode_attention, *args, num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_reference(*args), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_context_reads_split_keys(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk, cached, dtype
):
    """Chunks over compressed context, the chunk's own tokens either read back from the cache
    (the backend's call) or given fresh (rotated whole by M_h, scored against the whole M_h q)."""
    codec = codec_for(d, bits, outlier_bits, n, value_bits, hk)
    lens, q_lens = [block_size + 3, 40, 1], [block_size + 3, 7, 1]
    stored = lens if cached else [n - q for n, q in zip(lens, q_lens)]
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=5, stored=stored)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), hq, d, generator=torch.Generator().manual_seed(6))
    query = query.to(dtype)  # the reference gets the same (rounded) inputs, in float32
    key = value = None
    if not cached:
        key = torch.cat([k[c:] for k, c in zip(keys, stored)]).to(dtype)
        value = torch.cat([v[c:] for v, c in zip(values, stored)]).to(dtype)
    args = (cache, table, qsl, torch.tensor(lens, dtype=torch.int32), codec, d**-0.5)
    out = run_kernel(context_attention, query, key, value, *args)
    assert out.dtype == dtype
    fresh = (None, None) if cached else (key.float(), value.float())
    ref = context_attention_reference(query.float(), *fresh, *args)
    tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # 16-bit output
    torch.testing.assert_close(out.float(), ref, **tol)
