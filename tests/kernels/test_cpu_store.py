"""The C++ store against store_kv_reference: records within a store's tolerance
(cases.assert_records_close: an index may differ at a bucket boundary, a norm by one fp16 ulp),
and the same bytes whichever rows share a call and however many threads run it."""

import pytest
import torch
from cases import assert_records_close, split_codec, strided_view

from tq_vllm.kernels import dispatch
from tq_vllm.kernels.store import cpu_store
from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test, once per runnable C++ build


# -- the fused store -------------------------------------------------------------------------
# The kernel quantizes each (token, head) row alone in an order of its own; the reference's
# products and norms are ATen's. So the records are close to the reference's, and a row's bytes
# depend on nothing but the row.


def stores(key, value, slots, codec, num_blocks=4, block_size=16, extra=3):
    """(reference cache, fused cache), both 0xFF-filled before the store; records padded by
    `extra` bytes past the layout's record, which must stay 0xFF too."""
    shape = (num_blocks, key.shape[1], block_size, codec.layout.record_bytes + extra)
    ref = torch.full(shape, 0xFF, dtype=torch.uint8)
    got = ref.clone()
    store_kv_reference(key, value, ref, slots, codec)
    cpu_store.store_kv(key, value, got, slots, codec)
    return ref, got


def store_inputs(tokens, hk, d, dtype=torch.bfloat16, seed=0, num_slots=64):
    gen = torch.Generator().manual_seed(seed)
    key = (torch.randn(tokens, hk, d, generator=gen) * 2).to(dtype)
    value = torch.randn(tokens, hk, d, generator=gen).to(dtype)
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    return key, value, slots


# 40: not a multiple of 16, the portable path.
@pytest.mark.parametrize("d", [40, 64, 96, 128, 256])
@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_store_matches_reference_every_width(d, mode):
    key, value, slots = store_inputs(37, 2, d)
    for bits in range(1, 9):
        codec = LayerCodec(RecordLayout(d, bits, mode, 9 - bits), seed=bits)
        ref, got = stores(key, value, slots, codec)
        assert_records_close(codec, got, ref, key, value, slots)


@pytest.mark.parametrize("rotation", ["Haar", "Hadamard, two rows swapped"])
def test_store_rotates_by_the_fast_transform_only_where_the_matrix_is_hadamard(rotation):
    """A power-of-two rotation goes through the fast Hadamard transform only where it is one,
    entry for entry (float_rows.h, hadamard_signs); any other matrix keeps the dense product,
    so the records still match the reference's (a transform in its place would give other
    coordinates: with two rows swapped, two of them in each other's place)."""
    d = 64
    codec = LayerCodec(RecordLayout(d, 4, "mse", 4), seed=0)
    if rotation == "Haar":
        q, r = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1)))
        m = (q * torch.sign(torch.diagonal(r))).contiguous()
    else:
        m = codec.rotation[[0, 2, 1, *range(3, d)]].contiguous()  # entries +-c, orthogonal
    codec.rotation = codec.key.rotation = codec.value.rotation = m
    key, value, slots = store_inputs(37, 2, d)
    ref, got = stores(key, value, slots, codec)
    assert_records_close(codec, got, ref, key, value, slots)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 200])  # 3 rows on the calling thread; 600 in parallel
def test_store_bytes_do_not_depend_on_the_thread_count(threads, tokens):
    key, value, slots = store_inputs(tokens, 3, 64, torch.float32, num_slots=256)
    codec = LayerCodec(RecordLayout(64, 5, "mse", 4))
    alone = stores(key, value, slots, codec, 16)[1]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, got = stores(key, value, slots, codec, 16)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, alone)
    assert_records_close(codec, got, ref, key, value, slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keys", ["mse", "prod", "split"])
def test_a_tokens_record_does_not_depend_on_its_step(dtype, keys):
    """One call for 40 tokens, or one per token in reverse order: the same bytes. (ATen's
    products, which the store used until 2026-12-06, pick kernels by shape: a token's record
    could depend on how many tokens shared its step, so a speculative verify step or another
    chunking could store it differently.)"""
    key, value, slots = store_inputs(40, 3, 64, dtype, num_slots=64)
    codec = (
        split_codec(64, hk=3, seed=4)
        if keys == "split"
        else LayerCodec(RecordLayout(64, 4, keys, 3), seed=4)
    )
    together = stores(key, value, slots, codec)[1]
    alone = torch.full_like(together, 0xFF)
    for t in reversed(range(40)):
        cpu_store.store_kv(key[t : t + 1], value[t : t + 1], alone, slots[t : t + 1], codec)
    assert torch.equal(alone, together)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_padded_layout_padding_slots_and_dtypes(dtype):
    codec = LayerCodec(RecordLayout(64, 4, "prod", 3).padded(100), seed=2)
    key, value, slots = store_inputs(20, 3, 64, dtype)
    slots[[0, 7, 19]] = -1  # vLLM's padding: those tokens write nothing
    ref, got = stores(key, value, slots, codec)
    assert_records_close(codec, got, ref, key, value, slots)
    assert int((got != 0xFF).any(dim=(1, 3)).sum()) <= 17  # 17 slots written, no more
    ref, got = stores(key, value, torch.full_like(slots, -1), codec)
    assert (got == 0xFF).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_strided_views_of_a_fused_qkv(dtype):
    """vLLM passes key and value as views into one [T, (Hq + 2 Hk) d] qkv tensor (a float32
    model's stay strided through the rotation: store.cpp multiplies their rows as one matrix)."""
    hq, hk, d = 9, 3, 64
    qkv = torch.randn(16, (hq + 2 * hk) * d).to(dtype)
    _, key, value = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    key, value = key.view(16, hk, d), value.view(16, hk, d)
    assert not key.is_contiguous()
    slots = torch.arange(16) * 3
    for layout in (RecordLayout(d, 6, "mse", 4), RecordLayout(d, 3, "prod", 2)):
        codec = LayerCodec(layout, seed=0)
        ref, got = stores(key, value, slots, codec)
        assert_records_close(codec, got, ref, key, value, slots)
        contiguous = stores(key.contiguous(), value.contiguous(), slots, codec)[1]
        assert torch.equal(got, contiguous)


@pytest.mark.parametrize("mode", ["mse", "prod"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 0.0, 3e38, 1e5, 1e-30])
def test_store_bad_tokens_as_the_reference(mode, bad):
    """A non-finite coordinate, an all-zero vector, huge and tiny norms: what the reference
    stores (a zero norm for a non-finite vector, a saturated 65504), see test_bad_input.py."""
    key, value, slots = store_inputs(12, 3, 64, torch.float32)
    key[2, 1, 5] = bad
    value[4, 0, 9] = bad
    key[6, 2] = 0.0 if bad != bad or abs(bad) == float("inf") else bad  # a whole vector
    value[7, 1] = key[6, 2]
    for bits in (1, 2, 6):
        codec = LayerCodec(RecordLayout(64, bits, mode, bits), seed=0)
        ref, got = stores(key, value, slots, codec)
        assert_records_close(codec, got, ref, key, value, slots)


def test_ops_dispatches_cpu_stores_to_the_kernel(monkeypatch):
    key, value, slots = store_inputs(8, 3, 64)
    called = []
    monkeypatch.setattr(
        cpu_store, "store_kv", lambda *a: called.append(1) or store_kv_reference(*a)
    )
    mse = RecordLayout(64, 6, "mse", 4)
    for layout in (mse, RecordLayout(64, 6, "mse", 4, value_mode="uniform")):
        cache = torch.zeros(4, 3, 16, layout.record_bytes, dtype=torch.uint8)
        dispatch.store_kv(key, value, cache, slots, LayerCodec(layout, seed=0))
    assert called == [1]  # uniform values: the reference


def test_store_argument_errors():
    codec = LayerCodec(RecordLayout(64, 4, "mse", 4), seed=0)
    key, value, slots = store_inputs(4, 2, 64)
    cache = torch.zeros(4, 2, 16, codec.layout.record_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="value shape"):
        cpu_store.store_kv(key, value[:, :1], cache, slots, codec)
    with pytest.raises(ValueError, match="KV heads"):
        cpu_store.store_kv(key[:, :1], value[:, :1], cache, slots, codec)
    with pytest.raises(ValueError, match="slot_mapping has 3 slots"):
        cpu_store.store_kv(key, value, cache, slots[:3], codec)
    with pytest.raises(ValueError, match="kv_cache records"):
        cpu_store.store_kv(key, value, cache[..., :10].contiguous(), slots, codec)
    with pytest.raises(ValueError, match="key must"):
        cpu_store.store_kv(key.int(), value, cache, slots, codec)
    uniform = LayerCodec(RecordLayout(64, 4, "mse", 4, value_mode="uniform"), seed=0)
    with pytest.raises(ValueError, match="uniform"):
        cpu_store.store_kv(key, value, cache, slots, uniform)


def test_store_refuses_a_slot_past_the_cache():
    """A slot past the cache's last block raises and writes nothing, rather than writing out of
    bounds (the reference's indexing raises too)."""
    codec = LayerCodec(RecordLayout(64, 4, "mse", 4), seed=0)
    key, value, slots = store_inputs(4, 2, 64)
    cache = torch.zeros(4, 2, 16, codec.layout.record_bytes, dtype=torch.uint8)
    slots = slots.clone()
    slots[2] = 4 * 16  # one past the last slot
    with pytest.raises(RuntimeError, match=r"slot_mapping\[2\] = 64 is past the cache's 64"):
        cpu_store.store_kv(key, value, cache, slots, codec)
    assert not cache.any()
    with pytest.raises(IndexError):
        store_kv_reference(key, value, cache, slots, codec)


@pytest.mark.parametrize("store", [cpu_store.store_kv, store_kv_reference])
def test_store_into_a_strided_view(store):
    """Records land in the view's slots (as in a contiguous cache); the buffer's bytes around
    them stay untouched."""
    codec = LayerCodec(RecordLayout(64, 6, "mse", 5), seed=0)
    key, value, slots = store_inputs(20, 2, 64)
    expected = torch.zeros(4, 2, 16, codec.layout.record_bytes, dtype=torch.uint8)
    store(key, value, expected, slots, codec)
    view, buffer = strided_view(torch.zeros_like(expected))
    store(key, value, view, slots, codec)
    assert torch.equal(view, expected)
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, :2, :, : expected.shape[-1]] = False
    assert bool((buffer[outside] == 0xA5).all())
