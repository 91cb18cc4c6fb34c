"""The C++ exact part of the exact-window rule (window/exact.cpp) against
exact.exact_merge_reference, once per C++ build this CPU runs.

Tolerance: float32 CPU_TOL (atol 1e-5, rtol 1e-4): both sides compute in float32 from the same
keys, differing in summation order. bf16/fp16 queries and timelines: both round the same
float32 result once to the query's dtype, so they may differ by one unit in its last place
(atol = rtol = 1e-2 for bf16, 2e-3 for fp16). Timeline entries past each row's visible ones
are NaN for the op and 0 for the reference (which reads all W and masks), so a read past a
row's own position shows as NaN.
"""

import pytest
import torch
from cases import CPU_TOL

from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.kernels.window import cpu_exact
from tq_vllm.kernels.window.exact import exact_merge_reference

pytestmark = pytest.mark.usefixtures("cpu_isa")

TOL = {
    torch.float32: CPU_TOL,
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def inputs(n, hq, hk, d, window, dtype, seed=0):
    """n rows, each its own W timeline entries (the first `visible` its keys, NaN after), a
    compressed part, and log-sum-exps with -inf rows (nothing compressed yet)."""
    gen = torch.Generator().manual_seed(seed)
    visible = torch.randint(1, window + 1, (n,), generator=gen)
    visible[0], visible[-1] = 1, window  # a segment's first and last position
    window_start = torch.arange(n) * window
    timeline = torch.randn(n * window + window, hk, 2 * d, generator=gen).to(dtype)
    readable = torch.arange(len(timeline))[:, None] < (window_start + visible)[None, :]
    readable &= torch.arange(len(timeline))[:, None] >= window_start[None, :]
    hidden = ~readable.any(1)
    query = torch.randn(n, hq, d, generator=gen).to(dtype)
    compressed = torch.randn(n, hq, d, generator=gen)
    lse = torch.randn(n, hq, generator=gen) * 3
    lse[::3] = float("-inf")
    nan_timeline = timeline.clone()
    nan_timeline[hidden] = float("nan")
    timeline[hidden] = 0
    return query, timeline, nan_timeline, window_start, visible, compressed, lse


@pytest.mark.parametrize(
    "n, hq, hk, d, window",
    [
        (1, 3, 1, 64, 32),
        (7, 9, 3, 64, 32),
        (5, 8, 1, 128, 16),
        (40, 2, 2, 40, 8),
        (3, 4, 4, 256, 128),
    ],  # fmt: skip
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_merge_matches_reference(n, hq, hk, d, window, dtype):
    query, timeline, nan_timeline, start, visible, compressed, lse = inputs(
        n, hq, hk, d, window, dtype
    )
    scale = d**-0.5
    expected = exact_merge_reference(query, timeline, start, visible, window, scale, compressed,
                                     lse)  # fmt: skip
    got = cpu_exact.exact_merge(query, nan_timeline, start, visible, window, scale, compressed,
                                lse)  # fmt: skip
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


def test_dispatch_takes_the_op_on_the_cpu(monkeypatch):
    query, timeline, _, start, visible, compressed, lse = inputs(4, 6, 2, 64, 16, torch.float32)
    calls = []
    monkeypatch.setattr(cpu_exact, "exact_merge", lambda *a: calls.append(a) or a[-2])
    dispatch.exact_merge(query, timeline, start, visible, 16, 0.125, compressed, lse)
    assert len(calls) == 1
    monkeypatch.setattr(dispatch, "REFERENCE_ONLY", True)
    out = dispatch.exact_merge(query, timeline, start, visible, 16, 0.125, compressed, lse)
    assert len(calls) == 1 and out.shape == query.shape


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(visible=0), "reads 0 exact entries"),
        (dict(visible=17), "reads 17 exact entries"),
        (dict(start=-1), "from -1"),
        (dict(start=10_000), "inside the timeline"),
    ],
)
def test_out_of_range_rows_are_refused(change, message):
    query, timeline, _, start, visible, compressed, lse = inputs(4, 6, 2, 64, 16, torch.float32)
    if "visible" in change:
        visible[1] = change["visible"]
    if "start" in change:
        start[1] = change["start"]
    with pytest.raises(RuntimeError, match=message):
        cpu_extension.ops().exact_merge(query, timeline, start, visible, 16, 0.125, compressed,
                                        lse)  # fmt: skip
