"""Sparse V: the fused kernels skip a tile's values when every weight in it lies below the
threshold times its row's running maximum (the tile's weights still count in the softmax sum).

The kernels are compared with a reference of that exact rule (sparse_reference: tiles of the
kernel's size, walked in order, one split), at the kernels' usual tolerances; each case checks
that tiles were both skipped and read, and that skipping changed the result beyond the
tolerance, so a kernel that ignored the threshold (or skipped everything) fails.
"""

import math

import pytest
import torch
from cases import CPU_TOL, make_cache, run_kernel

from tq_vllm.kernels.context.reference import gather_context
from tq_vllm.kernels.context.triton_context import context_attention as triton_context
from tq_vllm.kernels.decode import cpu_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.decode.triton_decode import decode_attention as triton_decode
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

COEF = 0.8  # how far queries lean towards their peak keys: 25-50% of the tiles are skipped
THRESHOLD = 1e-3


def sparse_reference(query, cache, table, lens, codec, scale, threshold, tile):
    """(out [B, Hq, d] float32, tiles skipped, tiles in all) of decode under the rule."""
    hk = cache.shape[1]
    g = query.shape[1] // hk
    q = codec.rotate_queries(query).double() * scale
    out = torch.zeros(query.shape, dtype=torch.float64)
    skipped = total = 0
    for b, n in enumerate(lens):
        k, v = gather_context(cache, table[b], n, codec)  # [Hk, n, d], rotated
        for h in range(hk):
            rows = slice(h * g, (h + 1) * g)
            s = q[b, rows] @ k[h].double().T  # [g, n]
            m = torch.full((g,), -math.inf, dtype=torch.float64)
            keep = torch.zeros(n, dtype=torch.bool)
            for t0 in range(0, n, tile):
                top = s[:, t0 : t0 + tile].max(dim=1).values
                m = torch.maximum(m, top)
                total += 1
                if bool(((top - m) >= math.log(threshold)).any()):
                    keep[t0 : t0 + tile] = True
                else:
                    skipped += 1
            out[b, rows] = (torch.softmax(s, dim=-1) * keep) @ v[h].double()
    return codec.unrotate(out.float()), skipped, total


def peaked_case(d, hq, hk, tile):
    """A cache and queries aimed at three of the first 32 tokens of each sequence (a running
    maximum sees the peak first), so that many later tiles fall below it, but not all.
    Returns the decode arguments and the rule's output for tiles of `tile` tokens."""
    lens, seed = [300, 200, 130], d
    codec = LayerCodec(RecordLayout(d, 4, "mse", 4), seed=seed)
    cache, table, keys, _ = make_cache(codec, lens, 16, hk, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(len(lens), hq, d, generator=gen)
    g = hq // hk
    for b, n in enumerate(lens):
        for h in range(hk):
            picks = torch.randint(0, min(n, 32), (3,), generator=gen)
            query[b, h * g : (h + 1) * g] += COEF * keys[b][picks, h].sum(0)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    ref, skipped, total = sparse_reference(
        query, cache, table, lens, codec, d**-0.5, THRESHOLD, tile
    )
    assert 0 < skipped < total, (skipped, total)
    return (query, cache, table, seq_lens, codec, d**-0.5), ref


@pytest.mark.parametrize("d,hq,hk", [(64, 9, 3), (128, 4, 1)])
def test_cpu_decode_skips_by_the_rule(d, hq, hk, cpu_isa):
    args, ref = peaked_case(d, hq, hk, 64)
    got = cpu_decode.decode_attention(*args, num_splits=1, sparse_v=THRESHOLD)
    torch.testing.assert_close(got, ref, **CPU_TOL)
    dense = decode_attention_reference(*args)
    assert not torch.allclose(dense, ref, **CPU_TOL), "the skipped tiles changed nothing"


@pytest.mark.parametrize("d,hq,hk", [(64, 9, 3), (128, 4, 1)])
def test_triton_decode_skips_by_the_rule(d, hq, hk):
    """Against the rule at the fp16 kernel's tolerance for peaked softmaxes (3.3e-3 measured
    with or without sparse V), and the skipping's own effect (sparse minus plain, the same
    rounding on both sides) against the rule's to 2e-5."""
    args, ref = peaked_case(d, hq, hk, 32)
    got = run_kernel(triton_decode, *args, num_splits=1, sparse_v=THRESHOLD)
    plain = run_kernel(triton_decode, *args, num_splits=1)
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=5e-3)
    effect = ref - decode_attention_reference(*args)
    assert effect.abs().max() > 1e-4, "the skipped tiles changed nothing"
    torch.testing.assert_close(got - plain, effect, atol=2e-5, rtol=0)


def test_triton_context_skips_by_the_rule():
    """The cache-only context kernel (what vLLM calls for a chunk) on one-row chunks: the
    program's rows are then one GQA group, as in decode, so the same rule applies."""
    args, ref = peaked_case(64, 9, 3, 32)
    query, cache, table, seq_lens, codec, scale = args
    starts = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    context_args = (query, None, None, cache, table, starts, seq_lens, codec, scale)
    got = run_kernel(triton_context, *context_args, sparse_v=THRESHOLD)
    plain = run_kernel(triton_context, *context_args)
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(
        got - plain, ref - decode_attention_reference(*args), atol=2e-5, rtol=0
    )
