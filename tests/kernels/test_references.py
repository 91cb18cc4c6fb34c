"""The PyTorch attention path (CPU serving, kernel reference) against dense attention."""

import pytest
import torch
from cases import dense, dequantized, make_cache

from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout


@pytest.mark.parametrize("mode", ["mse", "prod"])
@pytest.mark.parametrize("d,hq,hk", [(64, 3, 1), (128, 8, 2)])
def test_context_attention(mode, d, hq, hk):
    codec = LayerCodec(RecordLayout(d, 3, mode, 2), seed=1)
    block_size, lens, q_lens = 16, [1, 16, 17, 40], [1, 5, 17, 3]
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=2)
    gen = torch.Generator().manual_seed(3)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), hq, d, generator=gen)
    key = torch.cat([k[len_ - ql :] for k, len_, ql in zip(keys, lens, q_lens)])
    value = torch.cat([v[len_ - ql :] for v, len_, ql in zip(values, lens, q_lens)])
    out = context_attention_reference(
        query, key, value, cache, table, qsl, torch.tensor(lens, dtype=torch.int32), codec, 0.125
    )
    for b, (length, ql) in enumerate(zip(lens, q_lens)):
        ctx = length - ql
        kd, vd = dequantized(codec, keys[b][:ctx], values[b][:ctx])
        k = torch.cat([kd, keys[b][ctx:]])
        v = torch.cat([vd, values[b][ctx:]])
        ref = dense(query[qsl[b] : qsl[b + 1]], k, v, ctx, 0.125)
        torch.testing.assert_close(out[qsl[b] : qsl[b + 1]].double(), ref, atol=2e-4, rtol=2e-4)


def test_decode_attention_and_padding_slots():
    codec = LayerCodec(RecordLayout(64, 4, "mse", 3), seed=0)
    lens = [1, 32, 33]
    cache, table, keys, values = make_cache(codec, lens, 32, 2, seed=4)
    before = cache.clone()
    store_kv_reference(
        torch.randn(2, 2, 64), torch.randn(2, 2, 64), cache, torch.tensor([-1, -1]), codec
    )
    assert torch.equal(cache, before)  # padded slots write nothing
    query = torch.randn(3, 6, 64)
    out = decode_attention_reference(query, cache, table, torch.tensor(lens), codec, 0.1)
    assert torch.isfinite(out).all()  # no NaN-filled (unwritten) slot was read
    for b, length in enumerate(lens):
        kd, vd = dequantized(codec, keys[b], values[b])
        ref = dense(query[b : b + 1], kd, vd, length - 1, 0.1)
        torch.testing.assert_close(out[b : b + 1].double(), ref, atol=2e-4, rtol=2e-4)


def test_new_tokens_from_cache_match_decode_steps():
    """key=None reads the new tokens back from the cache: a chunk of queries then gets what
    one decode step per token would."""
    codec = LayerCodec(RecordLayout(64, 3, "mse", 3), seed=0)
    lens = [20, 33]
    cache, table, keys, values = make_cache(codec, lens, 16, 1, seed=6)
    q_lens = [4, 33]
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), 3, 64)
    out = context_attention_reference(
        query, None, None, cache, table, qsl, torch.tensor(lens), codec, 0.125
    )
    for b, (length, ql) in enumerate(zip(lens, q_lens)):
        for i in range(ql):
            row = int(qsl[b]) + i
            step = decode_attention_reference(
                query[row : row + 1],
                cache,
                table[b : b + 1],
                torch.tensor([length - ql + i + 1]),
                codec,
                0.125,
            )
            torch.testing.assert_close(out[row : row + 1], step, atol=1e-5, rtol=1e-5)
