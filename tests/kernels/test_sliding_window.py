"""Sliding-window attention over the compressed cache (hybrid models' local layers): a query at
position p sees positions p - W < t <= p only.

The references are checked against a direct computation from the dequantized keys and values;
the C++ decode, the fused context path and the dense prefill path (vLLM's kernel and SDPA) are
checked against the references at the tolerances of test_cpu_attention.py, the Triton decode and
context kernels (interpreted here) at test_triton_context.py's 2e-3 (fp16 dots). Block-table entries
for blocks wholly before the first query row's window point at a never-written block (NaN
norms), as vLLM's sliding-window manager hands freed blocks back: a kernel that reads one
there returns NaN.
"""

import pytest
import torch
from cases import CPU_TOL, DENSE_TOL, dense_kernel_calls, make_cache, run_kernel

from tq_vllm.kernels import dispatch
from tq_vllm.kernels.context import cpu_context, dense, triton_context
from tq_vllm.kernels.context.reference import context_attention_reference, gather_context
from tq_vllm.kernels.decode import cpu_decode, triton_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

# Windows of one token, inside a block, a block, across blocks, longer than every sequence.
WINDOWS = [1, 5, 16, 37, 500]
TRITON_TOL = dict(atol=2e-3, rtol=2e-3)


def windowed_case(d, key_bits, value_bits, block_size, hk, lens, q_lens, window, seed=1):
    """A cache whose blocks before each sequence's first query row's window are freed (their
    table entries point at block 0, never written)."""
    codec = LayerCodec(RecordLayout(d, key_bits, "mse", value_bits), seed=d + key_bits)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=seed)
    for b, (n, q) in enumerate(zip(lens, q_lens)):
        first_seen = max(0, n - q - window + 1)
        table[b, : first_seen // block_size] = 0
    return codec, cache, table, torch.tensor(lens, dtype=torch.int32)


def direct(query, cache, table, starts, lens, codec, scale, window):
    """Softmax over each row's window, from gather_context's dequantized keys and values."""
    out = torch.zeros(query.shape)
    hq, hk = query.shape[1], cache.shape[1]
    for b, n in enumerate(lens.tolist()):
        lo, hi = int(starts[b]), int(starts[b + 1])
        k, v = gather_context(cache.clone(), table[b], n, codec)  # NaN where freed: not read
        q = codec.rotate_queries(query[lo:hi])
        for i in range(hi - lo):
            p = n - (hi - lo) + i
            seen = slice(max(0, p - window + 1), p + 1)
            for h in range(hq):
                kh = h // (hq // hk)
                w = torch.softmax((k[kh, seen] @ q[i, h]) * scale, dim=0)
                out[lo + i, h] = codec.unrotate(w @ v[kh, seen])
    return out


@pytest.mark.parametrize("window", WINDOWS)
def test_references_match_the_direct_computation(window):
    lens, q_lens = [70, 33, 1, 90], [1, 1, 1, 1]
    codec, cache, table, seq_lens = windowed_case(64, 4, 3, 16, 3, lens, q_lens, window)
    query = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(2))
    starts = torch.arange(5, dtype=torch.int32)
    want = direct(query, cache, table, starts, seq_lens, codec, 0.125, window)
    got = decode_attention_reference(query, cache, table, seq_lens, codec, 0.125, window)
    torch.testing.assert_close(got, want, **CPU_TOL)
    # Chunks: the whole sequence, a part after context, one row.
    q_lens = [70, 20, 1, 40]
    codec, cache, table, seq_lens = windowed_case(64, 4, 3, 16, 3, lens, q_lens, window)
    starts = torch.tensor([0, 70, 90, 91, 131], dtype=torch.int32)
    query = torch.randn(131, 9, 64, generator=torch.Generator().manual_seed(3))
    want = direct(query, cache, table, starts, seq_lens, codec, 0.125, window)
    args = (cache, table, starts, seq_lens, codec, 0.125)
    got = context_attention_reference(query, None, None, *args, sliding_window=window)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **CPU_TOL)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("d,key_bits,value_bits,block_size,hq,hk", [
    (64, 6, 5, 16, 9, 3), (128, 4, 4, 32, 8, 1), (40, 3, 2, 16, 2, 2),
])  # fmt: skip
def test_decode_matches_reference(d, key_bits, value_bits, block_size, hq, hk, window, num_splits):
    lens = [100, 16, 17, 1, 64]
    codec, cache, table, seq_lens = windowed_case(
        d, key_bits, value_bits, block_size, hk, lens, [1] * len(lens), window
    )
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(4))
    args = (query, cache, table, seq_lens, codec, d**-0.5)
    out = cpu_decode.decode_attention(*args, num_splits=num_splits, sliding_window=window)
    ref = decode_attention_reference(*args, sliding_window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **CPU_TOL)


@pytest.mark.usefixtures("cpu_isa")
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_fused_context_matches_reference(window, num_splits):
    """Chunks of fewer than DENSE_ROWS rows (the fused path), row tiles whose rows' windows
    start in different tiles, after long contexts."""
    lens, q_lens = [300, 90, 40, 15], [15, 7, 1, 15]
    codec, cache, table, seq_lens = windowed_case(64, 5, 4, 16, 3, lens, q_lens, window)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), 9, 64, generator=torch.Generator().manual_seed(5))
    args = (cache, table, starts, seq_lens, codec, 0.125)
    out = cpu_context.context_attention(query, *args, num_splits=num_splits, sliding_window=window)
    ref = context_attention_reference(query, None, None, *args, sliding_window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **CPU_TOL)


@pytest.mark.parametrize("attend", ["vllm", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", WINDOWS)
def test_dense_context_matches_reference(window, dtype, attend, monkeypatch):
    """Chunks of DENSE_ROWS rows or more: dequantized from the block holding the first row's
    window start, then vLLM's kernel with its sliding window, or SDPA with a mask."""
    lens, q_lens = [200, 70, 40], [70, 70, 20]
    codec, cache, table, seq_lens = windowed_case(64, 6, 4, 16, 3, lens, q_lens, window)
    kernel = dense_kernel_calls(monkeypatch, attend)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), 9, 64, generator=torch.Generator().manual_seed(6))
    args = (cache, table, starts, seq_lens, codec, 0.125)
    out = cpu_context.context_attention(query.to(dtype), *args, sliding_window=window)
    ref = context_attention_reference(query, None, None, *args, sliding_window=window)
    assert len(kernel) == 1 and out.dtype == dtype and torch.isfinite(out).all()
    if attend == "vllm":
        assert dense.vllm_cpu_attention is not None and not dense._unusable
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[dtype])


def test_dispatch_hands_the_window_down():
    lens = [50, 20]
    codec, cache, table, seq_lens = windowed_case(64, 4, 4, 16, 3, lens, [1, 1], 8)
    query = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(7))
    args = (query, cache, table, seq_lens, codec, 0.125)
    out = dispatch.decode_attention(*args, 50, 0.0, 8)
    torch.testing.assert_close(out, decode_attention_reference(*args, 8), **CPU_TOL)
    whole = decode_attention_reference(query, cache, table, seq_lens, codec, 0.125)
    assert torch.isnan(whole).any()  # without the window the freed blocks poison the output


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 16, 37, 500])
def test_triton_decode_matches_reference(window, num_splits):
    lens = [100, 17, 1, 64]
    codec, cache, table, seq_lens = windowed_case(64, 4, 4, 16, 3, lens, [1] * 4, window)
    query = torch.randn(4, 9, 64, generator=torch.Generator().manual_seed(8))
    args = (query, cache, table, seq_lens, codec, 0.125)
    out = run_kernel(
        triton_decode.decode_attention, *args, num_splits=num_splits, sliding_window=window
    )
    ref = decode_attention_reference(*args, sliding_window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TRITON_TOL)


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("window", [1, 5, 37, 500])
def test_triton_context_matches_reference(window, fresh):
    """Row tiles (64 rows: 21 positions x 3 heads) whose rows' windows start in different key
    tiles, after long contexts; the chunk read back from the cache, or given in full precision."""
    lens, q_lens = [150, 70, 40], [70, 30, 1]
    codec, cache, table, seq_lens = windowed_case(64, 5, 4, 16, 3, lens, q_lens, window)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(int(starts[-1]), 9, 64, generator=gen)
    key = value = None
    if fresh:
        key, value = torch.randn(2, int(starts[-1]), 3, 64, generator=gen)
    args = (query, key, value, cache, table, starts, seq_lens, codec, 0.125)
    out = run_kernel(triton_context.context_attention, *args, sliding_window=window)
    ref = context_attention_reference(*args, sliding_window=window)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **TRITON_TOL)
