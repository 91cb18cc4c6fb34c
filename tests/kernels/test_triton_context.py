"""The Triton context (chunked prefill) kernel against context_attention_reference.

Tolerance: atol = rtol = 2e-3 in float32 (compressed tokens are scored with fp16 dots, as in
decode; fresh tokens exactly for float32 queries). Only the context is written to the cache:
the chunk's own positions stay NaN there, so the fresh tokens must come from key/value.
"""

import pytest
import torch
from cases import make_cache, run_kernel

from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.context.triton_context import context_attention
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

TOL = dict(atol=2e-3, rtol=2e-3)


def run_case(
    d, key_bits, mode, value_bits, block_size, hq, hk, lens, q_lens, dtype=torch.float32, **kwargs
):
    codec = LayerCodec(RecordLayout(d, key_bits, mode, value_bits), seed=d + value_bits)
    stored = [n - q for n, q in zip(lens, q_lens)]
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=5, stored=stored)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), hq, d, generator=torch.Generator().manual_seed(6))
    key = torch.cat([k[c:] for k, c in zip(keys, stored)])
    value = torch.cat([v[c:] for v, c in zip(values, stored)])
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    args = (cache, table, qsl, seq_lens, codec, d**-0.5)
    out = run_kernel(
        context_attention, query.to(dtype), key.to(dtype), value.to(dtype), *args, **kwargs
    )
    ref = context_attention_reference(query, key, value, *args)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    return out.float(), ref


# Covering set: head_dim x bits x mode x block size x GQA {1, 3, 8}; chunks of 1 token, a
# fresh prefill (no context), context of exactly one block and one past a block boundary,
# chunks longer than a program's query tile.
CASES = [
    # d, key_bits, mode, value_bits, block_size, hq, hk, lens, q_lens
    (64, 2, "mse", 2, 16, 3, 1, [1, 16, 17, 40], [1, 5, 17, 3]),
    (64, 3, "prod", 4, 32, 8, 1, [33, 70], [1, 37]),
    (64, 8, "prod", 1, 16, 2, 2, [80, 9], [70, 9]),
    (128, 4, "prod", 3, 16, 1, 1, [17, 20], [1, 4]),
    (128, 1, "prod", 8, 32, 8, 1, [64, 33], [32, 17]),
    (128, 3, "mse", 3, 16, 9, 3, [18, 2], [2, 2]),
    (128, 5, "mse", 4, 32, 4, 2, [45], [12]),
    (256, 3, "prod", 2, 16, 3, 1, [16, 49], [16, 16]),
    (256, 2, "mse", 8, 32, 8, 1, [1, 40], [1, 7]),
    (256, 7, "prod", 6, 16, 2, 2, [24], [7]),
]


@pytest.mark.parametrize("d,key_bits,mode,value_bits,block_size,hq,hk,lens,q_lens", CASES)
def test_context_matches_reference(d, key_bits, mode, value_bits, block_size, hq, hk, lens, q_lens):
    out, ref = run_case(d, key_bits, mode, value_bits, block_size, hq, hk, lens, q_lens)
    torch.testing.assert_close(out, ref, **TOL)


def test_context_bf16_and_tiling_options():
    # bf16: fp16 dots for fresh tokens too; the tolerance covers bf16 output rounding.
    out, ref = run_case(128, 3, "prod", 3, 16, 4, 2, [40, 19], [24, 19], dtype=torch.bfloat16)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    out, ref = run_case(
        64, 4, "mse", 3, 32, 2, 1, [50, 30], [30, 3], rows=16, block_n=32, max_query_len=30
    )
    torch.testing.assert_close(out, ref, **TOL)


def test_context_argument_errors():
    codec = LayerCodec(RecordLayout(64, 3, "mse", 3), seed=0)
    cache, table, _, _ = make_cache(codec, [3], 16, 2, seed=0)
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    qsl = torch.tensor([0, 2], dtype=torch.int32)
    lens = torch.tensor([3], dtype=torch.int32)
    with pytest.raises(ValueError, match="key must be"):
        context_attention(q, k[:, :1], k, cache, table, qsl, lens, codec, 0.1)
    with pytest.raises(ValueError, match="query_start_loc"):
        context_attention(q, k, k, cache, table, qsl[:1], lens, codec, 0.1)
    with pytest.raises(ValueError, match="rows"):
        context_attention(q, k, k, cache, table, qsl, lens, codec, 0.1, rows=8)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 32"):
        context_attention(q, k, k, cache, table, qsl, lens, codec, 0.1, block_n=16)
    with pytest.raises(ValueError, match="value"):
        context_attention(q, k, k.to(torch.int8), cache, table, qsl, lens, codec, 0.1)


@pytest.mark.parametrize(
    "d,mode,hq,hk,lens,q_lens",
    [(64, "prod", 3, 1, [20, 33, 1], [4, 33, 1]), (128, "mse", 8, 2, [40], [17])],
)
def test_new_tokens_from_cache(d, mode, hq, hk, lens, q_lens):
    """key = value = None: the chunk's own tokens come back from the cache, causally."""
    codec = LayerCodec(RecordLayout(d, 3, mode, 2), seed=4)
    cache, table, _, _ = make_cache(codec, lens, 16, hk, seed=7)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), hq, d, generator=torch.Generator().manual_seed(8))
    args = (None, None, cache, table, qsl, torch.tensor(lens, dtype=torch.int32), codec, 0.1)
    out = run_kernel(context_attention, query, *args)
    torch.testing.assert_close(out, context_attention_reference(query, *args), **TOL)


# The path the backend serves (key = value = None) in every query dtype, with the default's
# 5-bit values, block sizes 16 to 128, and sequences of 0 and 1 tokens.
SERVED = [
    # dtype, d, key_bits, value_bits, block_size, hq, hk, lens, q_lens
    (torch.float32, 64, 6, 5, 16, 9, 3, [1, 40, 0], [1, 40, 0]),
    (torch.float16, 64, 6, 5, 32, 9, 3, [70, 1], [30, 1]),
    (torch.bfloat16, 128, 4, 5, 64, 8, 2, [130, 5], [65, 0]),
    (torch.float16, 128, 3, 3, 128, 4, 1, [200, 0], [72, 0]),
    (torch.bfloat16, 256, 4, 5, 128, 2, 1, [129, 1], [1, 1]),
]


@pytest.mark.parametrize("dtype,d,key_bits,value_bits,block_size,hq,hk,lens,q_lens", SERVED)
def test_served_path_every_dtype(dtype, d, key_bits, value_bits, block_size, hq, hk, lens, q_lens):
    codec = LayerCodec(RecordLayout(d, key_bits, "mse", value_bits), seed=d + key_bits)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=9)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), hq, d, generator=torch.Generator().manual_seed(10))
    args = (None, None, cache, table, qsl, torch.tensor(lens, dtype=torch.int32), codec, 0.1)
    out = run_kernel(context_attention, query.to(dtype), *args, max_query_len=max(q_lens))
    ref = context_attention_reference(query, *args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = TOL if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # 16-bit output
    torch.testing.assert_close(out.float(), ref, **tol)


def test_dispatch_passes_the_host_maxima_down(monkeypatch):
    """The backend knows the batch's longest chunk and sequence on the host; dispatch hands
    them to the Triton kernels, which would otherwise sync the device to read them (and the
    config's sparse-V threshold and the layer's sliding window with them)."""
    from tq_vllm.kernels import dispatch
    from tq_vllm.kernels.context import triton_context
    from tq_vllm.kernels.decode import triton_decode

    seen = {}
    monkeypatch.setattr(dispatch, "TRITON_EVERYWHERE", True)
    monkeypatch.setattr(triton_context, "context_attention", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(
        triton_decode,
        "decode_attention",
        lambda *a, **k: seen.update(m=a[-1], v=k["sparse_v"], w=k["sliding_window"]),
    )
    codec = LayerCodec(RecordLayout(64, 4, "mse", 4), seed=0)
    cache, table, _, _ = make_cache(codec, [5], 16, 1, seed=0)
    lens, starts = torch.tensor([5]), torch.tensor([0, 5])
    q = torch.randn(5, 1, 64)
    dispatch.context_attention(q, None, None, cache, table, starts, lens, codec, 0.1, 5, 0.01, 3)
    dispatch.decode_attention(q[:1], cache, table, lens, codec, 0.1, 5, 0.02, 4)
    assert seen == {"max_query_len": 5, "sparse_v": 0.01, "sliding_window": 3, "m": 5, "v": 0.02,
                    "w": 4}  # fmt: skip
