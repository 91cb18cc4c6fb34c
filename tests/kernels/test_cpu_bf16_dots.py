"""The C++ attention's bf16 dots (kernels/decode/bf16_dots.h) against the float32 references.

bf16 queries take them on builds with AVX512-BF16, for Lloyd-Max keys and values of
at most 6 bits at head dims 64, 128 and 256: the rotated query, the centroids and the softmax
weights are rounded to bf16 (relative error 2^-9 each) and every sum stays float32.
Tolerance: the dense path's bf16 bound (DENSE_TOL, atol = rtol = 3e-2, which the bf16 output's
own rounding needs), and the error's RMS under 1% of the reference output's RMS. Other builds
and layouts take the float32 path for the same calls and match it to CPU_TOL. Caches are
0xFF-filled (NaN norms) where nothing was stored, as in test_cpu_attention.py, so a token read
past a sequence (an odd tile's pairing, say) shows as NaN.
"""

import pytest
import torch
from cases import CPU_TOL, DENSE_TOL, make_cache

from tq_vllm.kernels import cpu_extension
from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.decode import cpu_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

pytestmark = pytest.mark.usefixtures("cpu_isa")  # every test, once per runnable C++ build


@pytest.fixture(autouse=True)
def bf16_dots(monkeypatch):  # on in serving unless TQ_VLLM_BF16_DOTS=0
    monkeypatch.setattr(cpu_decode, "BF16_DOTS", True)


# Every width 1-6, head dims 64/128/256, blocks 16/32, GQA 1/3/4, odd and even lengths, tiles
# of 64 tokens whole and partial.
CASES = [
    # d, key_bits, value_bits, block_size, hq, hk, lens
    (64, 6, 5, 16, 9, 3, [1, 16, 17, 100, 333]),
    (64, 4, 4, 32, 3, 1, [63, 64, 65]),
    (128, 5, 3, 16, 8, 2, [40, 7]),
    (256, 2, 6, 16, 4, 1, [129]),
    (64, 1, 1, 16, 2, 2, [50, 3]),
    (64, 3, 2, 32, 6, 2, [90]),
]


def setup(d, key_bits, value_bits, block_size, hk, lens):
    codec = LayerCodec(RecordLayout(d, key_bits, "mse", value_bits), seed=d + key_bits)
    cache, table, _, _ = make_cache(codec, lens, block_size, hk, seed=1)
    return codec, cache, table, torch.tensor(lens, dtype=torch.int32)


def takes_bf16_dots() -> bool:
    return cpu_extension.chosen_variant() == "avx512_bf16"


def check_bf16(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[torch.bfloat16])
    rms = lambda x: x.float().pow(2).mean().sqrt()  # noqa: E731
    assert rms(out.float() - ref) < 0.01 * rms(ref)


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("d,key_bits,value_bits,block_size,hq,hk,lens", CASES)
def test_decode_matches_reference(d, key_bits, value_bits, block_size, hq, hk, lens, num_splits):
    codec, cache, table, seq_lens = setup(d, key_bits, value_bits, block_size, hk, lens)
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(2))
    query = query.to(torch.bfloat16).float()  # the same numbers in both dtypes
    args = (cache, table, seq_lens, codec, d**-0.5)
    ref = decode_attention_reference(query, *args)
    out32 = cpu_decode.decode_attention(query, *args, num_splits=num_splits)
    torch.testing.assert_close(out32, ref, **CPU_TOL)  # float32 queries: the float32 path
    out16 = cpu_decode.decode_attention(query.bfloat16(), *args, num_splits=num_splits)
    check_bf16(out16, ref)
    if takes_bf16_dots():  # the bf16 path ran: its rounding differs from the float32 path's
        assert not torch.equal(out16, out32.bfloat16())


@pytest.mark.parametrize("window", [0, 5, 70])
@pytest.mark.parametrize("rows_per_tile", [1, 3, 4])
def test_chunks_windows_and_row_tiles(rows_per_tile, window):
    """Query chunks after context (causal rows), row tiles of up to 4 x GQA rows and sliding
    windows: the rows of one tile see different numbers of tokens."""
    codec, cache, table, seq_lens = setup(64, 6, 5, 16, 3, [150, 64, 9])
    q_lens = [67, 1, 9]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), 9, 64, generator=torch.Generator().manual_seed(4))
    query = query.to(torch.bfloat16)
    args = (cache, table, starts, seq_lens, codec, 0.125)
    window = window or None
    ref = context_attention_reference(query.float(), None, None, *args, sliding_window=window)
    out = cpu_decode.run_attention(query, *args, rows_per_tile, 0, sliding_window=window)
    check_bf16(out, ref)


def test_sparse_values_and_float16_queries():
    codec, cache, table, seq_lens = setup(128, 6, 4, 16, 2, [300, 45])
    query = torch.randn(2, 6, 128, generator=torch.Generator().manual_seed(5)) * 3
    args = (cache, table, seq_lens, codec, 128**-0.5)
    ref = decode_attention_reference(query.bfloat16().float(), *args)
    # Sparse V skips tiles whose weights are all tiny: still within the bound.
    check_bf16(cpu_decode.decode_attention(query.bfloat16(), *args, sparse_v=1e-4), ref)
    # fp16 queries keep float32 dots (bf16 would round them more than the model does).
    out = cpu_decode.decode_attention(query.half(), *args)
    ref = decode_attention_reference(query.half().float(), *args)
    torch.testing.assert_close(out.float(), ref, **DENSE_TOL[torch.float16])
