"""The PyTorch attention path (CPU serving, kernel reference) against dense attention."""

import pytest
import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.kernels.attention_reference import (
    context_attention_reference,
    decode_attention_reference,
)
from tq_vllm.kernels.store import store_kv_reference
from tq_vllm.layout import RecordLayout


def make_batch(codec, lens, block_size, hk, seed):
    """Store every sequence's tokens in a NaN-filled cache with shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    d = codec.head_dim
    per_seq = [(len_ + block_size - 1) // block_size for len_ in lens]
    num_blocks = sum(per_seq) + 2
    cache = torch.full(
        (num_blocks, hk, block_size, codec.layout.record_bytes), 0xFF, dtype=torch.uint8
    )
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 is never handed out
    table = torch.zeros(len(lens), max(per_seq), dtype=torch.int32)
    keys, values, taken = [], [], 0
    for b, n in enumerate(per_seq):
        table[b, :n] = order[taken : taken + n]
        taken += n
    for b, length in enumerate(lens):
        k = torch.randn(length, hk, d, generator=gen)
        v = torch.randn(length, hk, d, generator=gen)
        pos = torch.arange(length)
        slots = table[b, pos // block_size].long() * block_size + pos % block_size
        store_kv_reference(k, v, cache, slots, codec)
        keys.append(k)
        values.append(v)
    return cache, table, keys, values


def dense(q, k, v, context, scale):
    """q [L, Hq, d], k/v [S, Hk, d]: plain causal softmax attention, float64."""
    hq, hk = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(hq // hk, 1)
    v = v.double().repeat_interleave(hq // hk, 1)
    s = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    allowed = torch.arange(k.shape[0]) <= torch.arange(q.shape[0]).unsqueeze(1) + context
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hls,shd->lhd", p, v)


def dequantized(codec, k, v):
    kd = codec.key.dequantize(codec.key.quantize(k))
    vd = codec.value.dequantize(codec.value.quantize(v))
    return kd, vd


@pytest.mark.parametrize("mode", ["mse", "prod"])
@pytest.mark.parametrize("d,hq,hk", [(64, 3, 1), (128, 8, 2)])
def test_context_attention(mode, d, hq, hk):
    codec = LayerCodec(RecordLayout(d, 3, mode, 2), seed=1)
    block_size, lens, q_lens = 16, [1, 16, 17, 40], [1, 5, 17, 3]
    cache, table, keys, values = make_batch(codec, lens, block_size, hk, seed=2)
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
    cache, table, keys, values = make_batch(codec, lens, 32, 2, seed=4)
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
    cache, table, keys, values = make_batch(codec, lens, 16, 1, seed=6)
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
