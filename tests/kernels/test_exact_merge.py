"""The C++ exact part of the exact-window rule (window/exact.cpp) against
exact.exact_merge_reference, once per C++ build this CPU runs.

Tolerance: float32 CPU_TOL (atol 1e-5, rtol 1e-4): both sides compute in float32 from the same
keys, differing in summation order. bf16/fp16 queries and keys: both round the same float32
result once to the query's dtype, so they may differ by one unit in its last place (atol = rtol
= 1e-2 for bf16, 2e-3 for fp16). Ring slots that no earlier step wrote are NaN (in the short
sequences some are), so a read of one shows as NaN; the query, key and value are row slices of
wider tensors (as vLLM's fused QKV projection gives them), so the op's row strides are
exercised.
"""

import pytest
import torch
from cases import CPU_TOL

from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.kernels.window import cpu_exact
from tq_vllm.kernels.window.exact import (
    ExactRule,
    exact_index,
    exact_merge_reference,
    write_ring_reference,
)

pytestmark = pytest.mark.usefixtures("cpu_isa")

TOL = {
    torch.float32: CPU_TOL,
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def inputs(seqs, hq, hk, d, window, dtype, ring_dtype=None, extra=0, seed=0):
    """One step: seqs (tokens after the step, tokens in it) per sequence, its ExactIndex, rings
    holding each sequence's R tokens before the step (NaN elsewhere), the step's rows, a
    compressed part, and log-sum-exps with -inf rows (nothing compressed yet)."""
    gen = torch.Generator().manual_seed(seed)
    ring_size = window + extra
    lens, q_lens = [n for n, _ in seqs], [q for _, q in seqs]
    rings = torch.randperm(len(seqs) + 1, generator=gen)[: len(seqs)]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    index = exact_index(starts, torch.tensor(lens), rings, ExactRule(window, 4 * window), ring_size)
    ring = torch.full(
        (len(seqs) + 1, hk, ring_size, 2 * d), float("nan"), dtype=ring_dtype or dtype
    )
    for b, (n, q) in enumerate(seqs):
        for t in range(max(0, n - q - ring_size), n - q):
            ring[rings[b], :, t % ring_size] = torch.randn(hk, 2 * d, generator=gen).to(ring.dtype)
    t = int(starts[-1])
    qkv = torch.randn(t, hq + 2 * hk + 1, d, generator=gen).to(dtype)
    query, key, value = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk : hq + 2 * hk]
    compressed = torch.randn(t, hq, d, generator=gen)
    lse = torch.randn(t, hq, generator=gen) * 3
    lse[::3] = float("-inf")
    return query, key, value, ring, index, compressed, lse


# hq, hk, d, window, ring slots past W, (tokens after, tokens in the step) per sequence, the
# rule's anchor at 4W: decodes at a grain's first, last and middle position, a first token,
# chunks starting mid-grain and spanning grains.
CASES = [
    (3, 1, 64, 32, 0, [(1, 1), (32, 1), (33, 1), (50, 1)]),
    (9, 3, 64, 32, 3, [(100, 7), (40, 1), (64, 2)]),
    (8, 1, 128, 16, 0, [(75, 20), (16, 1)]),
    (2, 2, 40, 8, 2, [(30, 11), (9, 1), (8, 8)]),
    (4, 4, 256, 128, 0, [(300, 3), (129, 1)]),
]


@pytest.mark.parametrize("hq, hk, d, window, extra, seqs", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_merge_matches_reference(hq, hk, d, window, extra, seqs, dtype):
    args = inputs(seqs, hq, hk, d, window, dtype, extra=extra)
    query, key, value, ring, index, compressed, lse = args
    scale = d**-0.5
    expected = exact_merge_reference(
        query, key, value, ring, index, window, scale, None, compressed, lse
    )
    got = cpu_exact.exact_merge(
        query, key, value, ring, index, window, scale, None, compressed, lse
    )
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


def test_exact_merge_rounds_own_tokens_as_a_bf16_ring_holds_them():
    """A float32 model's ring is bf16: the step's own keys are read rounded to bf16 too."""
    query, key, value, ring, index, compressed, lse = inputs(
        CASES[1][5], 9, 3, 64, 32, torch.float32, ring_dtype=torch.bfloat16, extra=3
    )
    args = (ring, index, 32, 0.125, None, compressed, lse)
    got = cpu_exact.exact_merge(query, key, value, *args)
    rounded = exact_merge_reference(query, key.bfloat16().float(), value.bfloat16().float(), *args)
    torch.testing.assert_close(got, rounded, **CPU_TOL)
    unrounded = exact_merge_reference(query, key, value, ring.float(), *args[1:])
    assert (got - unrounded).abs().max() > 1e-4  # the rounding shows


def test_exact_merge_of_some_rows():
    """Rows picked out of the step (the rest went to a prefill kernel) read the same entries."""
    seqs = CASES[3][5]
    query, key, value, ring, index, compressed, lse = inputs(
        seqs, 2, 2, 40, 8, torch.float32, extra=2
    )
    rows = torch.tensor([0, 4, 11, 12, 19])
    whole = exact_merge_reference(query, key, value, ring, index, 8, 0.2, None, compressed, lse)
    got = cpu_exact.exact_merge(
        query[rows], key, value, ring, index, 8, 0.2, rows, compressed[rows], lse[rows]
    )
    torch.testing.assert_close(got, whole[rows], **CPU_TOL)


def test_dispatch_takes_the_op_on_the_cpu(monkeypatch):
    query, key, value, ring, index, compressed, lse = inputs(CASES[0][5], 3, 1, 64, 32,
                                                             torch.float32)  # fmt: skip
    args = (query, key, value, ring, index, 32, 0.125, None, compressed, lse)
    calls = []
    monkeypatch.setattr(cpu_exact, "exact_merge", lambda *a: calls.append(a) or a[-2])
    dispatch.exact_merge(*args)
    assert len(calls) == 1
    monkeypatch.setattr(dispatch, "REFERENCE_ONLY", True)
    out = dispatch.exact_merge(*args)
    assert len(calls) == 1 and out.shape == query.shape


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("visible", 0, "reads 0 exact entries"),
        ("visible", 33, "reads 33 exact entries"),
        ("ring_reads", 5, "5 of them from ring"),
        ("row_ring", 9, "inside the 5 rings"),
        ("rows", 99, "is step row 99 of"),
        ("ring", 16, "a ring of 16 slots cannot hold a 32-token window"),
    ],
)
def test_out_of_range_rows_are_refused(field, value, message):
    query, key, value_, ring, index, compressed, lse = inputs(CASES[0][5], 3, 1, 64, 32,
                                                              torch.float32)  # fmt: skip
    rows = torch.arange(len(query))
    if field == "rows":
        rows[1] = value
    elif field == "ring":
        ring = ring[:, :, :value]
    else:
        getattr(index, field)[1] = value
    with pytest.raises(RuntimeError, match=message):
        cpu_extension.ops().exact_merge(
            query, key, value_, ring, rows, index.segment_starts, index.visible, index.row_ring,
            index.ring_reads, 32, 0.125, compressed, lse,
        )  # fmt: skip


@pytest.mark.parametrize("ring_dtype", [torch.float32, torch.bfloat16])
def test_write_ring_matches_reference(ring_dtype):
    """The step's tokens into the rings from row slices of a wider tensor, rounded to the
    ring's dtype; every other slot keeps its bits (NaN stays NaN)."""
    query, key, value, ring, index, _, _ = inputs(
        CASES[1][5], 9, 3, 64, 32, torch.float32, ring_dtype=ring_dtype, extra=3
    )
    expected = ring.clone()
    write_ring_reference(expected, key, value, index)
    cpu_exact.write_ring(ring, key, value, index)
    torch.testing.assert_close(ring, expected, equal_nan=True, rtol=0, atol=0)


def test_write_ring_refuses_a_slot_past_the_ring():
    _, key, value, ring, index, _, _ = inputs(CASES[0][5], 3, 1, 64, 32, torch.float32)
    index.write_slots[0] = 32
    with pytest.raises(RuntimeError, match="slot 32 is out of range"):
        cpu_exact.write_ring(ring, key, value, index)
