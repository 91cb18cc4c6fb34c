"""The exact-window rule (compressed part by each kernel family + exact part, merged by
log-sum-exp) against the direct reference, and the ring's reads and writes.

Kernels: the C++ op (once per build this CPU runs), the Triton decode kernel (interpreter) and
the PyTorch reference, chosen the way the backend chooses them (kernels/dispatch.py).
Tolerance: CPU_TOL (atol 1e-5, rtol 1e-4) for the C++ op and the reference: both sides compute
in float32 from the same codes and the same exact keys, differing in summation order and the
kernel's exp. Triton: atol = rtol = 2e-3, its dots take fp16 operands (as in
test_triton_decode.py). Rings are NaN-filled wherever no earlier step wrote, so a read of a
slot the rule does not allow shows.
"""

import itertools
from dataclasses import dataclass

import pytest
import torch
from cases import CPU_TOL, DENSE_TOL, make_cache, split_codec

from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.kernels.context.cpu_context import dense_sequences
from tq_vllm.kernels.context.dense import _cpu_attention_isa
from tq_vllm.kernels.window import cpu_exact, windowed
from tq_vllm.kernels.window.exact import ExactRule, exact_index
from tq_vllm.kernels.window.reference import exact_window_attention_reference
from tq_vllm.kernels.window.windowed import CHUNK_ROWS, windowed_attention, windowed_step
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

TRITON_TOL = dict(atol=2e-3, rtol=2e-3)


@pytest.fixture(params=[*cpu_extension.runnable_variants(), "triton", "reference"])
def tolerance(request, monkeypatch):
    """Routes the compressed part to one kernel family; returns the tolerance it is held to."""
    if request.param == "triton":
        monkeypatch.setattr(dispatch, "TRITON_EVERYWHERE", True)
        return TRITON_TOL
    if request.param == "reference":
        monkeypatch.setattr(dispatch, "REFERENCE_ONLY", True)
        return CPU_TOL
    monkeypatch.setattr(cpu_extension, "chosen_variant", lambda: request.param)
    assert cpu_extension.available(), "the C++ CPU ops did not build (see the log)"
    return CPU_TOL


# d, key_bits, value_bits, block_size, hq, hk, rule (window, anchor), per sequence (tokens
# after this step, tokens this step), ring slots past W: decodes at an anchor, just past it
# and away from it, at a grain's first and last position; chunks that start mid-grain, span
# an anchor and several grains, and do not divide W; chunks past compressed tokens on both
# sides of a decode row (one call over rows that are not one run). An anchor of W is the rule
# of whole W-aligned segments.
CASES = [
    (64, 4, 4, 16, 3, 1, (16, 32), [(1, 1), (16, 1), (17, 1), (31, 1), (33, 1), (40, 1)], 0),
    (64, 6, 5, 32, 9, 3, (32, 64), [(100, 37), (33, 5), (64, 64), (97, 1)], 0),
    (64, 6, 5, 32, 9, 3, (32, 64), [(100, 37), (33, 1), (97, 20), (64, 18)], 0),
    (128, 3, 3, 16, 8, 1, (16, 16), [(50, 1), (75, 20)], 3),
    (64, 2, 3, 16, 2, 2, (32, 128), [(31, 31), (90, 7), (32, 2)], 4),
]


def _whole_chunks(whole_chunk, query, cache, codec):
    """The reference's whole_chunks for windowed_attention(..., whole_chunk): chunks read
    exactly from their first row's s where they run in vLLM's CPU kernel (the C++ family, the
    dense path's dtypes and layouts, a head dim the kernel takes); elsewhere prefill rows read
    as decode rows do."""
    in_vllm = (
        dispatch.cpu_kernel(cache, codec)
        and dense_sequences(query, codec, [CHUNK_ROWS]) == [0]
        and _cpu_attention_isa(query.dtype, query.shape[-1]) is not None
    )
    return CHUNK_ROWS if whole_chunk and in_vllm else 0


def _ring_holding(keys, values, lens, q_lens, hk, d, ring_size):
    """Rings (NaN-filled) as earlier steps leave them: each sequence's last R tokens before
    this step, at slot position mod R; ring b belongs to sequence b, in a shuffled order."""
    order = torch.randperm(len(lens) + 1, generator=torch.Generator().manual_seed(5))[1:]
    ring = torch.full((len(lens) + 1, hk, ring_size, 2 * d), float("nan"))
    for b, (n, q) in enumerate(zip(lens, q_lens)):
        for t in range(max(0, n - q - ring_size), n - q):
            ring[order[b], :, t % ring_size] = torch.cat([keys[b][t], values[b][t]], -1)
    return ring, order


@pytest.mark.parametrize("whole_chunk", [False, True])
@pytest.mark.parametrize("d,kb,vb,block_size,hq,hk,rule,seqs,extra", CASES)
def test_windowed_attention_matches_reference(
    d, kb, vb, block_size, hq, hk, rule, seqs, extra, whole_chunk, tolerance
):
    rule = ExactRule(*rule)
    window = rule.window
    codec = LayerCodec(RecordLayout(d, kb, "mse", vb), seed=d + kb)
    lens, q_lens = [n for n, _ in seqs], [q for _, q in seqs]
    ring_size = window + extra
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=1)
    ring, rings = _ring_holding(keys, values, lens, q_lens, hk, d, ring_size)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    key = torch.cat([k[n - q : n] for k, n, q in zip(keys, lens, q_lens)])
    value = torch.cat([v[n - q : n] for v, n, q in zip(values, lens, q_lens)])
    query = torch.randn(len(key), hq, d, generator=torch.Generator().manual_seed(2))
    index = exact_index(starts, seq_lens, rings, rule, ring_size)
    before = ring.clone()
    out = windowed_attention(
        query, key, value, cache, table, ring, index, codec, d**-0.5, rule,
        whole_chunk=whole_chunk,
    )  # fmt: skip
    whole = _whole_chunks(whole_chunk, query, cache, codec)
    ref = exact_window_attention_reference(
        query, cache, table, starts, seq_lens, keys, values, codec, d**-0.5, rule, whole
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **tolerance)
    assert torch.equal(ring.isnan(), before.isnan())  # attention reads the ring only

    # Then the step's own last R tokens go in; nothing else moves.
    dispatch.write_ring(ring, key, value, index)
    expected = before.clone()
    for b, (n, q) in enumerate(zip(lens, q_lens)):
        for t in range(max(n - q, n - ring_size), n):
            expected[rings[b], :, t % ring_size] = torch.cat([keys[b][t], values[b][t]], -1)
    torch.testing.assert_close(ring, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("ring_dtype", [torch.float32, torch.bfloat16])
def test_windowed_attention_is_chunking_invariant(tolerance, ring_dtype):
    """The rule depends on positions only: one 70-token prefill, or chunks of 9 (with the ring
    carrying each chunk's first exact tokens over), give the same rows. A float32 model's ring is
    bf16 (exact.ring_dtype): then a step's own exact tokens are read as rounded as the ring's,
    and both match the reference over the bf16-rounded keys and values."""
    d, hk, hq, window, block_size = 64, 1, 3, 16, 16
    rule = ExactRule(window, anchor=64)
    codec = LayerCodec(RecordLayout(d, 4, "mse", 4), seed=3)
    cache, table, keys, values = make_cache(codec, [70], block_size, hk, seed=4)
    query = torch.randn(70, hq, d, generator=torch.Generator().manual_seed(6))
    ring = torch.full((2, hk, window, 2 * d), float("nan"), dtype=ring_dtype)
    rings = torch.tensor([1])

    def step(lo, hi):
        starts = torch.tensor([0, hi - lo], dtype=torch.int32)
        index = exact_index(starts, torch.tensor([hi], dtype=torch.int32), rings, rule, window)
        k, v = keys[0][lo:hi], values[0][lo:hi]
        out = windowed_attention(query[lo:hi], k, v, cache, table, ring, index, codec, 0.125, rule)
        dispatch.write_ring(ring, k, v, index)
        return out

    whole = step(0, 70)
    ring.fill_(float("nan"))
    chunked = torch.cat([step(lo, min(lo + 9, 70)) for lo in range(0, 70, 9)])
    torch.testing.assert_close(chunked, whole, **tolerance)
    rounded = [keys[0].to(ring_dtype).float()], [values[0].to(ring_dtype).float()]
    seq = dict(query_start_loc=torch.tensor([0, 70]), seq_lens=torch.tensor([70]))
    ref = exact_window_attention_reference(
        query, cache, table, **seq, keys=rounded[0], values=rounded[1], codec=codec,
        scale=0.125, rule=rule,
    )  # fmt: skip
    torch.testing.assert_close(whole, ref, **tolerance)


RULE_32 = ExactRule(32, anchor=128)


def test_exact_rule_positions():
    """W 32 (grain 8), anchor 128: back to the anchor for the first rows after one, else the
    newest 25 .. 32 positions; rows of a grain share their start; W must divide the anchor."""
    starts = {0: 0, 31: 0, 32: 8, 39: 8, 40: 16, 127: 96, 128: 128, 159: 128, 160: 136}
    assert {p: RULE_32.start(p) for p in starts} == starts
    positions = torch.arange(1000)
    s = RULE_32.start(positions)
    assert torch.equal(s, RULE_32.start(positions // 8 * 8))
    assert torch.equal(s, torch.tensor([RULE_32.start(p) for p in range(1000)]))
    seen = positions - s + 1
    assert seen.min() == 1 and seen.max() == 32
    assert (seen[positions % 128 >= 31] >= 25).all()
    assert torch.equal(ExactRule(32, anchor=32).start(positions), positions // 32 * 32)
    with pytest.raises(ValueError, match="dividing the block size"):
        ExactRule(32, anchor=48)


def test_exact_index_refuses_a_ring_smaller_than_the_window():
    with pytest.raises(ValueError, match="cannot hold a 32-token window"):
        exact_index(torch.tensor([0, 1]), torch.tensor([5]), torch.tensor([0]), RULE_32, 16)


@pytest.mark.parametrize("layout", ["mse", "split keys", "uniform values"])
@pytest.mark.parametrize("whole_chunk", [False, True])
def test_windowed_attention_in_bf16(whole_chunk, layout, tolerance):
    """bf16 rows as a bf16 model gives them. On the CPU the prefill chunks (16 rows or more)
    run in one call of vLLM's kernel in the rotated basis (split keys: a rotation per head;
    uniform values stay in the model's), by the rule (dense_window.py) or (whole_chunk)
    reading exactly from their first row's s; the decode rows through the C++ op. Tolerance:
    DENSE_TOL's bf16 bound (the output's own rounding), against the float32 reference over the
    same bf16 numbers."""
    d, kb, vb, _, _, hk, rule, _, _ = CASES[1]
    rule = ExactRule(*rule)
    if layout == "split keys":
        codec = split_codec(d, bits=3, hk=hk, seed=d + kb)
    else:
        value_mode = "uniform" if layout == "uniform values" else "mse"
        codec = LayerCodec(RecordLayout(d, kb, "mse", vb, value_mode=value_mode), seed=d + kb)
        if layout == "uniform values" and dispatch.TRITON_EVERYWHERE:
            pytest.skip("uniform values (an eval baseline) have no Triton kernel")
    step = _bf16_step(codec, CASES[1])
    query, cache, table, starts, seq_lens, keys, values = step.reference_args
    out = windowed_attention(*step.args, codec, d**-0.5, rule, whole_chunk=whole_chunk)
    whole = _whole_chunks(whole_chunk, query, cache, codec)
    ref = exact_window_attention_reference(
        query.float(), cache, table, starts, seq_lens, keys, values, codec, d**-0.5, rule, whole
    )
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[torch.bfloat16])
    if whole:  # the chunks' rows read more exactly than by the rule (0.139 apart at most)
        by_rule = exact_window_attention_reference(
            query.float(), cache, table, starts, seq_lens, keys, values, codec, d**-0.5, rule
        )
        assert (by_rule - ref).abs().max() > 3 * DENSE_TOL[torch.bfloat16]["atol"]


@dataclass
class Bf16Step:
    args: tuple  # windowed_attention's query .. index
    reference_args: tuple  # query, cache, table, starts, seq_lens, keys, values


def _bf16_step(codec, case) -> Bf16Step:
    """A step of case's sequences and one more decode row, in bf16 as a bf16 model gives it."""
    d, _, _, block_size, hq, hk, rule, seqs, _ = case
    rule = ExactRule(*rule)
    lens, q_lens = [n for n, _ in seqs] + [70], [q for _, q in seqs] + [1]
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=1)
    keys = [k.bfloat16().float() for k in keys]
    values = [v.bfloat16().float() for v in values]
    ring, rings = _ring_holding(keys, values, lens, q_lens, hk, d, rule.window)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    key = torch.cat([k[n - q : n] for k, n, q in zip(keys, lens, q_lens)])
    value = torch.cat([v[n - q : n] for v, n, q in zip(values, lens, q_lens)])
    query = torch.randn(len(key), hq, d, generator=torch.Generator().manual_seed(2)).bfloat16()
    index = exact_index(starts, seq_lens, rings, rule, rule.window)
    return Bf16Step(
        (query, key.bfloat16(), value.bfloat16(), cache, table, ring.bfloat16(), index),
        (query, cache, table, starts, seq_lens, keys, values),
    )


@pytest.mark.skipif(_cpu_attention_isa(torch.bfloat16, 64) is None, reason="no vLLM CPU kernel")
def test_vllm_ops_failing_mid_step_leave_the_fused_path_a_whole_output(cpu_isa, monkeypatch):
    """vLLM's ops are its internals: when its kernel fails in a step (a schema that changed),
    after writing vLLM's output buffer in place (a first chunk's rows), with_vllm_ops gives them
    up and every row of the step, those included, is served by the fused kernels: the rule's
    output within the bf16 tolerance, nothing of the failed call left (it wrote NaN)."""
    import vllm._custom_ops as ops

    from tq_vllm.kernels.context import dense

    monkeypatch.setattr(dense, "_unusable", [])
    calls = []

    def failing(*, output, **kwargs):
        calls.append(output.data_ptr())
        output.fill_(float("nan"))
        raise RuntimeError("cpu_attention_with_kv_cache: a schema of its own")

    monkeypatch.setattr(ops, "cpu_attention_with_kv_cache", failing)
    # CASES[1] with a 30-token prompt's first chunk (in place: it reads no compressed token).
    case = (*CASES[1][:7], [(100, 37), (33, 5), (30, 30), (97, 1)], 0)
    d, kb, vb, _, _, _, rule, _, _ = case
    codec = LayerCodec(RecordLayout(d, kb, "mse", vb), seed=d + kb)
    rule = ExactRule(*rule)
    step = _bf16_step(codec, case)
    query, cache, table, starts, seq_lens, keys, values = step.reference_args
    given = torch.full_like(query, float("nan"))
    out = windowed_attention(*step.args, codec, d**-0.5, rule, out=given)
    # The one call was the in-place one (the first chunk's), and the ops are given up.
    assert len(calls) == 1 and given.data_ptr() <= calls[0] < given[-1].data_ptr()
    assert dense._unusable
    ref = exact_window_attention_reference(
        query.float(), cache, table, starts, seq_lens, keys, values, codec, d**-0.5, rule
    )
    assert out is given and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[torch.bfloat16])


@pytest.mark.skipif(_cpu_attention_isa(torch.bfloat16, 64) is None, reason="no vLLM CPU kernel")
@pytest.mark.parametrize(
    "lens,q_lens,whole_chunk",
    [
        ((24, 20), (24, 20), False),
        ((24, 37), (24, 37), True),
        ((100, 70), (100, 70), True),
        ((28, 26), (20, 18), False),  # chunks after 8 tokens, inside the first window
        ((90, 20), (80, 20), True),  # a chunk from position 10: all of it reads from s = 0
        ((24, 5, 20), (24, 1, 20), False),  # a decode row between them: two runs of rows
    ],
)
def test_chunks_of_exact_tokens_are_the_model_dtypes_own_attention(
    lens, q_lens, whole_chunk, cpu_isa
):
    """Chunks that read exact tokens only (a prompt's first chunk, shorter than the window or
    any length with whole_chunk: 100 rows are 4 pages, the last padded; or one that starts
    inside the first window, its earlier tokens in the ring) are vLLM's kernel over their keys
    and values as they came, no rotation on the way in or out, all of the step's in one call:
    each chunk's rows equal the model dtype's own attention of that prompt alone (vLLM's kernel
    over a bf16 cache of all its tokens, from a contiguous query), bit for bit; a decode row
    among them (fused: float32 over the bf16 ring) within the bf16 tolerance."""
    from tq_vllm.kernels.context.dense import vllm_cpu_attention

    hq, hk, d = 9, 3, 64
    codec = LayerCodec(RecordLayout(d, 5, "mse", 3), seed=1)
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(n, hk, d, generator=gen).bfloat16().float() for n in lens]
    values = [torch.randn(n, hk, d, generator=gen).bfloat16().float() for n in lens]
    rows = sum(q_lens)
    # Query, key and value as vLLM's backend gets them: views of one fused qkv projection, rows
    # strided (vLLM's kernel reads the query in place).
    qkv = torch.empty(rows, (hq + 2 * hk) * d, dtype=torch.bfloat16)
    query = qkv[:, : hq * d].view(rows, hq, d)
    key = qkv[:, hq * d : (hq + hk) * d].view(rows, hk, d)
    value = qkv[:, (hq + hk) * d :].view(rows, hk, d)
    query.copy_(torch.randn(rows, hq, d, generator=gen))
    key.copy_(torch.cat([k[n - q :] for k, n, q in zip(keys, lens, q_lens)]))
    value.copy_(torch.cat([v[n - q :] for v, n, q in zip(values, lens, q_lens)]))
    # 0xFF records decode to NaN norms, and the rings hold NaN where no earlier step wrote: a
    # compressed token or a ring slot read by mistake poisons the output.
    cache = torch.full((16, hk, 16, codec.layout.record_bytes), 0xFF, dtype=torch.uint8)
    ring, rings = _ring_holding(keys, values, lens, q_lens, hk, d, 32)
    rule = ExactRule(32, 64)
    bounds = [0, *itertools.accumulate(q_lens)]
    starts = torch.tensor(bounds, dtype=torch.int32)
    index = exact_index(starts, torch.tensor(lens), rings, rule, 32)
    table = torch.arange(8 * len(lens), dtype=torch.int32).view(-1, 8) % 16
    given = torch.full_like(query, float("nan"))  # as vLLM's buffer: every row must be written
    out = windowed_attention(query, key, value, cache, table, ring.bfloat16(), index, codec,
                             d**-0.5, rule, whole_chunk=whole_chunk, out=given)  # fmt: skip
    assert out is given
    for b, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        k, v = (t[b].bfloat16().transpose(0, 1) for t in (keys, values))
        own = vllm_cpu_attention(query[lo:hi].contiguous(), [k], [v], [hi - lo], d**-0.5)
        assert own is not None  # vLLM's kernel ran
        exact = dict(atol=0, rtol=0) if hi - lo > 1 else DENSE_TOL[torch.bfloat16]
        torch.testing.assert_close(out[lo:hi], own, **exact)


@pytest.mark.parametrize("keys", ["mse", "prod", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_decode_step_is_one_op(keys, dtype, cpu_isa, monkeypatch):
    """A decode step (one row per sequence) on the CPU goes to cpu_exact.decode_step, one op
    for the store, the attention and the ring's write: the same bytes in the cache and the
    ring, and the same bits out, as the general path's store_kv, _merged (which picks rows,
    checks arguments and wraps each op) and write_ring; and the reference's result (over keys
    and values rounded to the model dtype, as the ring holds them) within the dense path's
    tolerance for the dtype (bf16 queries take the op's bf16 dots). The step's slots start as
    0xFF bytes (NaN norms); slot -1 (padding) writes nothing."""
    d, hq, hk, block_size = 64, 6, 3, 16
    rule = ExactRule(16, anchor=32)
    if keys == "split":
        codec = split_codec(d, hk=hk, seed=5)
    else:
        codec = LayerCodec(RecordLayout(d, 4, keys, 3), seed=5)
    lens = [1, 31, 33, 90, 20]
    stored = [n - 1 for n in lens]  # the step stores each sequence's last token
    cache, table, keys_, values = make_cache(codec, lens, block_size, hk, seed=6, stored=stored)
    slots = torch.stack([table[b, n // block_size] * block_size + n % block_size
                         for b, n in enumerate(stored)]).long()  # fmt: skip
    slots[-1] = -1  # a padded row: its slot stays 0xFF
    ring, rings = _ring_holding(keys_, values, lens, [1] * len(lens), hk, d, rule.window)
    starts = torch.arange(len(lens) + 1, dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    key = torch.stack([k[n - 1] for k, n in zip(keys_, lens)]).to(dtype)
    value = torch.stack([v[n - 1] for v, n in zip(values, lens)]).to(dtype)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    index = exact_index(starts, seq_lens, rings, rule, rule.window)
    general_cache, general_ring = cache.clone(), ring.to(dtype)
    ring = ring.to(dtype)
    calls = []
    direct = cpu_exact.decode_step
    monkeypatch.setattr(cpu_exact, "decode_step", lambda *a: calls.append(1) or direct(*a))
    out = torch.full_like(query, float("nan"))
    windowed_step(query, key, value, out, cache, slots, table, ring, index, codec, 0.125, rule)
    assert calls == [1]
    dispatch.store_kv(key, value, general_cache, slots, codec)
    general = windowed._merged(query, key, value, general_cache, table, general_ring, index,
                               starts.tolist(), codec, 0.125, rule, 0.0)  # fmt: skip
    dispatch.write_ring(general_ring, key, value, index)
    assert out.dtype == dtype and torch.equal(out, general)
    assert torch.equal(cache, general_cache)
    assert torch.equal(ring.nan_to_num(7.0), general_ring.nan_to_num(7.0))
    written = [(cache[s // block_size, :, s % block_size] != 0xFF).any() for s in slots[:-1]]
    padded = table[-1, stored[-1] // block_size], stored[-1] % block_size
    assert all(written) and (cache[padded[0], :, padded[1]] == 0xFF).all()
    rounded = [k.to(dtype).float() for k in keys_], [v.to(dtype).float() for v in values]
    ref = exact_window_attention_reference(
        query.float(), cache, table, starts, seq_lens, *rounded, codec, 0.125, rule
    )
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[dtype])


@pytest.mark.skipif(_cpu_attention_isa(torch.bfloat16, 64) is None, reason="no vLLM CPU kernel")
def test_a_served_chunk_beside_a_sequence_of_no_rows_leaves_no_fused_work(cpu_isa, monkeypatch):
    """A step whose rows vLLM's kernel serves (a first chunk) beside a sequence with no rows
    (rows [30, 0]) leaves nothing to the fused kernels (fails if the empty sequence's zero rows
    reach them), and the chunk is the rule's output."""
    d, hq, hk, block_size = 64, 9, 3, 32
    rule = ExactRule(32, 64)
    codec = LayerCodec(RecordLayout(d, 5, "mse", 3), seed=1)
    lens, q_lens = [30, 20], [30, 0]
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=1, stored=[0, 20])
    keys = [k.bfloat16().float() for k in keys]
    values = [v.bfloat16().float() for v in values]
    ring, rings = _ring_holding(keys, values, lens, q_lens, hk, d, rule.window)
    starts = torch.tensor([0, 30, 30], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    index = exact_index(starts, seq_lens, rings, rule, rule.window)
    query = torch.randn(30, hq, d, generator=torch.Generator().manual_seed(4)).bfloat16()
    monkeypatch.setattr(windowed, "_merged", None)  # a call would raise
    out = windowed_attention(query, keys[0].bfloat16(), values[0].bfloat16(), cache, table,
                             ring.bfloat16(), index, codec, d**-0.5, rule)  # fmt: skip
    ref = exact_window_attention_reference(
        query.float(), cache, table, starts, seq_lens, keys, values, codec, d**-0.5, rule
    )
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[torch.bfloat16])


def test_a_step_with_a_sequence_of_no_rows_takes_the_general_path(cpu_isa, monkeypatch):
    """decode_step pairs row i with block_table row i: a sequence with no rows this step (rows
    [1, 0, 1]) must leave the step to the general path, which finds each row's sequence."""
    d, hq, hk, block_size = 64, 3, 1, 16
    rule = ExactRule(16, anchor=32)
    codec = LayerCodec(RecordLayout(d, 4, "mse", 3), seed=5)
    lens, q_lens = [40, 20, 70], [1, 0, 1]
    stored = [n - q for n, q in zip(lens, q_lens)]
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=6, stored=stored)
    slots = torch.tensor([table[b, n // block_size] * block_size + n % block_size
                          for b, n in ((0, 39), (2, 69))])  # fmt: skip
    ring, rings = _ring_holding(keys, values, lens, q_lens, hk, d, rule.window)
    starts = torch.tensor([0, 1, 1, 2], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    key = torch.stack([keys[0][39], keys[2][69]])
    value = torch.stack([values[0][39], values[2][69]])
    query = torch.randn(2, hq, d, generator=torch.Generator().manual_seed(7))
    index = exact_index(starts, seq_lens, rings, rule, rule.window)
    monkeypatch.setattr(cpu_exact, "decode_step", None)  # a call would raise
    out = torch.full_like(query, float("nan"))
    windowed_step(query, key, value, out, cache, slots, table, ring, index, codec, 0.125, rule)
    ref = exact_window_attention_reference(
        query, cache, table, starts, seq_lens, keys, values, codec, 0.125, rule
    )
    torch.testing.assert_close(out, ref, **CPU_TOL)
