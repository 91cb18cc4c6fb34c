"""The Triton store kernel against store_kv_reference (runs in the Triton interpreter here).

What must match (cases.assert_records_close): every byte outside the written fields (unwritten
slots, padding, slot -1) exactly; fp16 norms within 1 ulp (the kernel sums squares in another
order); packed indices exactly, except at coordinates whose rotated value lies within 1e-5 of a
bucket boundary (the kernel's rotation rounds differently from torch's matmul); in prod mode,
for vectors whose indices all match, QJL sign bits exactly except where |S r'| < 1e-4 ||r'||.
"""

import pytest
import torch
from cases import DEVICE, assert_fp16_close, assert_records_close, run_kernel, strided_view

from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.kernels.store.triton_store import store_kv
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout, decode_records


def run_case(
    d, key_bits, mode, value_bits, block_size, hk, num_tokens, pad=0, dtype=torch.float32, seed=0
):
    layout = RecordLayout(d, key_bits, mode, value_bits)
    if pad:
        layout = layout.padded(layout.size + pad)
    codec = LayerCodec(layout, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = (num_tokens + block_size - 1) // block_size + 2
    cache = torch.full((num_blocks, hk, block_size, layout.record_bytes), 0xFF, dtype=torch.uint8)
    key = (torch.randn(num_tokens, hk, d, generator=gen) * 2).to(dtype)
    value = torch.randn(num_tokens, hk, d, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[1::3] = -1  # vLLM's padding tokens
    got, ref = cache.clone(), cache.clone()
    run_kernel(store_kv, key, value, got, slots, codec)
    store_kv_reference(key, value, ref, slots, codec)
    assert_records_close(codec, got, ref, key, value, slots)


# A covering set: every head_dim, key bits 1..8, value bits 1..4 and 8, both modes, both block
# sizes, padded records, token counts below/at/above the kernel's 16-token tile.
CASES = [
    # d, key_bits, mode, value_bits, block_size, hk, tokens, pad
    (64, 2, "mse", 2, 16, 1, 1, 0),
    (64, 3, "prod", 4, 32, 2, 17, 5),
    (64, 8, "prod", 3, 16, 2, 16, 0),
    (128, 4, "prod", 3, 16, 2, 20, 0),
    (128, 1, "prod", 8, 32, 1, 9, 3),
    (128, 8, "mse", 1, 16, 3, 33, 0),
    (128, 1, "mse", 2, 32, 2, 5, 0),
    (256, 3, "mse", 4, 32, 2, 18, 1),
    (256, 2, "prod", 2, 16, 1, 7, 0),
    (256, 5, "prod", 8, 32, 1, 3, 0),
]


@pytest.mark.parametrize("d,key_bits,mode,value_bits,block_size,hk,tokens,pad", CASES)
def test_store_matches_reference(d, key_bits, mode, value_bits, block_size, hk, tokens, pad):
    run_case(d, key_bits, mode, value_bits, block_size, hk, tokens, pad)


def test_store_bf16_input_and_strided_heads():
    run_case(128, 3, "prod", 3, 16, 2, 12, dtype=torch.bfloat16)
    codec = LayerCodec(RecordLayout(64, 4, "mse", 4), seed=3)
    qkv = torch.randn(10, 3, 2, 64)  # key/value as views into a fused qkv: strided tokens
    cache = torch.full((3, 2, 16, codec.layout.record_bytes), 0xFF, dtype=torch.uint8)
    slots = torch.arange(10) + 5
    got, ref = cache.clone(), cache.clone()
    dev_qkv = qkv.to(DEVICE)  # slice on the kernel's device so the views stay strided there
    run_kernel(store_kv, dev_qkv[:, 1], dev_qkv[:, 2], got, slots, codec)
    store_kv_reference(qkv[:, 1], qkv[:, 2], ref, slots, codec)
    assert_records_close(codec, got, ref, qkv[:, 1], qkv[:, 2], slots)


def test_padding_slots_write_nothing():
    codec = LayerCodec(RecordLayout(64, 3, "prod", 3), seed=0)
    cache = torch.full((2, 1, 16, codec.layout.record_bytes), 0xFF, dtype=torch.uint8)
    k, empty = torch.randn(3, 1, 64), torch.randn(0, 1, 64)
    run_kernel(store_kv, k, k, cache, torch.full((3,), -1), codec)
    assert bool((cache == 0xFF).all())
    run_kernel(store_kv, empty, empty, cache, torch.zeros(0, dtype=torch.long), codec)
    assert bool((cache == 0xFF).all())


def test_store_argument_errors():
    codec = LayerCodec(RecordLayout(64, 3, "mse", 3), seed=0)
    cache = torch.zeros(2, 1, 16, codec.layout.record_bytes, dtype=torch.uint8)
    k = torch.randn(2, 1, 64)
    slots = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(k, k, cache, slots.float(), codec)
    with pytest.raises(ValueError, match="kv_cache"):
        store_kv(k, k, cache.float(), slots, codec)
    with pytest.raises(ValueError, match="key"):
        store_kv(k[0], k, cache, slots, codec)
    uniform = LayerCodec(RecordLayout(64, 3, "mse", 3, value_mode="uniform"), seed=0)
    with pytest.raises(
        ValueError, match="value_mode 'uniform' records cannot be read by this kernel"
    ):
        store_kv(k, k, cache.new_zeros(2, 1, 16, uniform.layout.record_bytes), slots, uniform)
    with pytest.raises(ValueError, match="head_dim 96 not supported by the Triton kernels"):
        codec96 = LayerCodec(RecordLayout(96, 3, "mse", 3), seed=0)
        cache96 = torch.zeros(2, 1, 16, codec96.layout.record_bytes, dtype=torch.uint8)
        store_kv(torch.randn(2, 1, 96), torch.randn(2, 1, 96), cache96, slots, codec96)


def test_store_into_a_strided_view():
    codec = LayerCodec(RecordLayout(64, 6, "mse", 5), seed=0)
    gen = torch.Generator().manual_seed(3)
    key, value = torch.randn(20, 2, 64, generator=gen), torch.randn(20, 2, 64, generator=gen)
    slots = torch.randperm(64, generator=gen)[:20]
    expected = torch.zeros(4, 2, 16, codec.layout.record_bytes, dtype=torch.uint8)
    store_kv_reference(key, value, expected, slots, codec)
    view, buffer = strided_view(torch.zeros_like(expected))
    run_kernel(store_kv, key, value, view, slots, codec)
    got, _ = decode_records(codec.layout, view.clone())
    ref, _ = decode_records(codec.layout, expected)
    assert_fp16_close(got.norms, ref.norms, "key norms")
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, :2, :, : expected.shape[-1]] = False
    assert bool((buffer[outside] == 0xA5).all())
