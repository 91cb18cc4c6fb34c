"""Bad keys and values at the kernel level: non-finite, all-zero and huge vectors.

The serving path does not check keys and values (a check would cost a device sync per layer and
step); what it guarantees is containment. A key or value with a NaN or inf coordinate spoils
only its own record (one token, one KV head): every store writes its norm as 0, so the record
reads back as the zero vector, and every other record is byte-identical to a store without the
bad token. Attention of every other sequence, every other KV head's query heads, and every
query before the bad token is bit-identical to the clean run, and no output is NaN: inside its
own sequence and head the bad token weighs in as a zero key (score 0) or a zero value.
"""

import pytest
import torch
from cases import run_kernel

from tq_vllm.kernels import dispatch
from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.context.triton_context import context_attention
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.decode.triton_decode import decode_attention
from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.kernels.store.triton_store import store_kv
from tq_vllm.quant.quantizer import FP16_MAX
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout, decode_records

D, HQ, HK, BS = 64, 9, 3, 16  # the embedded model's attention shape
LENS = [40, 24]
BAD_SEQ, BAD_POS, BAD_HEAD = 0, 10, 1
GROUP = HQ // HK
STORES = {
    "reference": store_kv_reference,
    "triton": lambda *args: run_kernel(store_kv, *args),
    "ops": dispatch.store_kv,  # what the CPU server runs (the C++ store when it builds)
}
DECODES = {
    "reference": decode_attention_reference,
    "triton": lambda *args: run_kernel(decode_attention, *args),
    "ops": dispatch.decode_attention,  # what the CPU server runs
}
CONTEXTS = {
    "reference": context_attention_reference,
    "triton": lambda *args: run_kernel(context_attention, *args),
    "ops": dispatch.context_attention,
}


def codec() -> LayerCodec:
    return LayerCodec(RecordLayout(D, 6, "mse", 4), seed=0)  # the default preset


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values of both sequences in one step ([T, Hk, d] bf16, as vLLM passes them),
    their slots in a zeroed cache, and the block table."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(LENS)
    key = (torch.randn(total, HK, D, generator=gen) * 1.5).bfloat16()
    value = torch.randn(total, HK, D, generator=gen).bfloat16()
    per_seq = [-(-n // BS) for n in LENS]
    table = torch.zeros(len(LENS), max(per_seq), dtype=torch.int32)
    table[0, : per_seq[0]] = torch.arange(per_seq[0]) + 1
    table[1, : per_seq[1]] = torch.arange(per_seq[1]) + 1 + per_seq[0]
    pos = [torch.arange(n) for n in LENS]
    slots = torch.cat([table[b, p // BS].long() * BS + p % BS for b, p in enumerate(pos)])
    return key, value, slots, table


def stored(store, key, value, slots) -> torch.Tensor:
    c = codec()
    num_blocks = 1 + sum(-(-n // BS) for n in LENS)
    cache = torch.zeros(num_blocks, HK, BS, c.layout.record_bytes, dtype=torch.uint8)
    store(key, value, cache, slots, c)
    return cache


def poisoned(which: str, bad: float) -> tuple[torch.Tensor, torch.Tensor]:
    key, value, _, _ = batch()
    key, value = key.clone(), value.clone()
    (key if which == "key" else value)[BAD_POS, BAD_HEAD, 5] = bad
    return key, value


def bad_record_mask(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(cache, dtype=torch.bool)
    slot = int(slots[BAD_POS])  # sequence 0 comes first in the batch
    mask[slot // BS, BAD_HEAD, slot % BS] = True
    return mask


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("store", list(STORES))
def test_non_finite_input_spoils_only_its_own_record(store, which, bad):
    key, value, slots, _ = batch()
    clean = stored(STORES[store], key, value, slots)
    bad_key, bad_value = poisoned(which, bad)
    dirty = stored(STORES[store], bad_key, bad_value, slots)
    own = bad_record_mask(clean, slots)
    assert torch.equal(clean[~own], dirty[~own]), "a bad token changed other records"
    slot = int(slots[BAD_POS])
    k, v = decode_records(codec().layout, dirty[slot // BS, BAD_HEAD, slot % BS].unsqueeze(0))
    assert float((k if which == "key" else v).norms[0]) == 0.0


def attention_inputs(bad_key, bad_value):
    key, value, slots, table = batch()
    clean = stored(store_kv_reference, key, value, slots)
    dirty = stored(store_kv_reference, bad_key, bad_value, slots)
    return clean, dirty, table


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("impl", list(DECODES))
def test_decode_of_other_sequences_and_heads_unaffected(impl, which, bad):
    clean, dirty, table = attention_inputs(*poisoned(which, bad))
    query = torch.randn(len(LENS), HQ, D, generator=torch.Generator().manual_seed(1))
    seq_lens = torch.tensor(LENS, dtype=torch.int32)
    args = (table, seq_lens, codec(), D**-0.5)
    ref = DECODES[impl](query, clean, *args)
    out = DECODES[impl](query, dirty, *args)
    assert torch.isfinite(ref).all()
    others = torch.ones(len(LENS), HQ, dtype=torch.bool)
    others[BAD_SEQ, BAD_HEAD * GROUP : (BAD_HEAD + 1) * GROUP] = False
    assert torch.equal(out[others], ref[others])
    assert torch.isfinite(out).all()  # the bad token reads back as a zero key or value


@pytest.mark.parametrize("which", ["key", "value"])
@pytest.mark.parametrize("impl", list(CONTEXTS))
def test_context_attention_before_the_bad_token_unaffected(impl, which):
    """A whole-sequence chunk read back from the cache (key = value = None, the serving path):
    queries before the bad position never see it (causal)."""
    clean, dirty, table = attention_inputs(*poisoned(which, float("nan")))
    qsl = torch.tensor([0] + LENS).cumsum(0).to(torch.int32)
    query = torch.randn(sum(LENS), HQ, D, generator=torch.Generator().manual_seed(2))
    args = (None, None)
    tail = (table, qsl, torch.tensor(LENS, dtype=torch.int32), codec(), D**-0.5)
    ref = CONTEXTS[impl](query, *args, clean, *tail)
    out = CONTEXTS[impl](query, *args, dirty, *tail)
    assert torch.isfinite(ref).all()
    seen = torch.zeros(sum(LENS), HQ, dtype=torch.bool)  # rows that attend to the bad token
    seen[BAD_POS : LENS[0], BAD_HEAD * GROUP : (BAD_HEAD + 1) * GROUP] = True
    assert torch.equal(out[~seen], ref[~seen])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("store", list(STORES))
def test_all_zero_vectors_round_trip_to_zero(store):
    key, value, slots, table = batch()
    key[BAD_POS], value[BAD_POS + 1] = 0, 0
    cache = stored(STORES[store], key, value, slots)
    c = codec()
    records = cache[table[0].long()].transpose(0, 1).reshape(HK, -1, cache.shape[3])
    k_hat, v_hat = c.decode_rotated(records[:, : LENS[0]])
    assert torch.equal(k_hat[:, BAD_POS], torch.zeros(HK, D))
    assert torch.equal(v_hat[:, BAD_POS + 1], torch.zeros(HK, D))
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()
    query = torch.randn(len(LENS), HQ, D, generator=torch.Generator().manual_seed(3))
    seq_lens = torch.tensor(LENS, dtype=torch.int32)
    out = dispatch.decode_attention(query, cache, table, seq_lens, c, D**-0.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("store", list(STORES))
def test_norms_near_the_fp16_limit_stay_finite(store):
    """bf16 keys and values reach far past fp16's 65504: the stored norm saturates, the record
    decodes to a finite vector in the input's direction, no larger than the input."""
    key, value, slots, table = batch()
    norms = torch.tensor([6e4, 65504.0, 1e5, 1e7])
    rows = torch.arange(4) + 2  # tokens 2..5 of sequence 0
    for x in (key, value):
        unit = x[rows].float() / x[rows].float().norm(dim=-1, keepdim=True)
        x[rows] = (unit * norms[:, None, None]).bfloat16()
    cache = stored(STORES[store], key, value, slots)
    c = codec()
    records = cache[table[0].long()].transpose(0, 1).reshape(HK, -1, cache.shape[3])
    k_codes, v_codes = decode_records(c.layout, records[:, rows])
    for codes, quantizer, x in ((k_codes, c.key, key), (v_codes, c.value, value)):
        assert torch.isfinite(codes.norms.float()).all()
        assert bool((codes.norms.float() <= FP16_MAX).all())
        x_hat = quantizer.dequantize(codes)  # [Hk, 4, d]
        x_in = x[rows].transpose(0, 1).float()
        assert torch.isfinite(x_hat).all()
        cos = torch.nn.functional.cosine_similarity(x_hat, x_in, dim=-1)
        assert bool((cos > 0.95).all()), cos
        assert bool((x_hat.norm(dim=-1) <= x_in.norm(dim=-1) * (1 + 2**-9)).all())
    query = torch.randn(len(LENS), HQ, D, generator=torch.Generator().manual_seed(4))
    seq_lens = torch.tensor(LENS, dtype=torch.int32)
    for impl in DECODES.values():
        assert torch.isfinite(impl(query, cache, table, seq_lens, c, D**-0.5)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_uniform_values_contain_a_non_finite_value(bad):
    """value_mode 'uniform' (the upstream emulation) too: the bad value reads back as zeros,
    every output stays finite and rows that never see the token are unchanged."""
    c = LayerCodec(RecordLayout(D, 6, "mse", 4, value_mode="uniform"), seed=0)
    key, value, slots, table = batch()
    _, bad_value = poisoned("value", bad)
    num_blocks = 1 + sum(-(-n // BS) for n in LENS)
    caches = []
    for v in (value, bad_value):
        cache = torch.zeros(num_blocks, HK, BS, c.layout.record_bytes, dtype=torch.uint8)
        store_kv_reference(key, v, cache, slots, c)
        caches.append(cache)
    slot = int(slots[BAD_POS])
    _, codes = decode_records(c.layout, caches[1][slot // BS, BAD_HEAD, slot % BS].unsqueeze(0))
    assert torch.equal(c.value.dequantize(codes), torch.zeros(1, D))
    qsl = torch.tensor([0] + LENS).cumsum(0).to(torch.int32)
    query = torch.randn(sum(LENS), HQ, D, generator=torch.Generator().manual_seed(2))
    tail = (table, qsl, torch.tensor(LENS, dtype=torch.int32), c, D**-0.5)
    ref, out = (dispatch.context_attention(query, None, None, cache, *tail) for cache in caches)
    assert torch.isfinite(out).all()
    seen = torch.zeros(sum(LENS), HQ, dtype=torch.bool)
    seen[BAD_POS : LENS[0], BAD_HEAD * GROUP : (BAD_HEAD + 1) * GROUP] = True
    assert torch.equal(out[~seen], ref[~seen])
