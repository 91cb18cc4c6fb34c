"""Split keys (outlier channels): the math, the record, and every CPU path that reads them.

Tolerances: the C++ dequantize is compared exactly (float32, and one rounding to 16 bits); the
fused C++ attention against the float32 reference at cases.CPU_TOL (same codes, other
summation order); the dense path (bf16/fp16 attention over the dequantized values) at the dense
path's tolerances (cases.DENSE_TOL); rotations and reconstructions at 1e-5.
Caches are 0xFF-filled (NaN norms) wherever nothing was stored (make_cache).
"""

import pytest
import torch
from cases import CPU_TOL, DENSE_TOL, assert_records_close, make_cache, split_codec
from cases import outlier_channels as channels

from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.kernels.context import cpu_context
from tq_vllm.kernels.context.reference import context_attention_reference, gather_context
from tq_vllm.kernels.decode import cpu_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.store import cpu_store
from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.quant.outliers import SplitKeyQuantizer
from tq_vllm.quant.quantizer import SERVED_GAIN, TurboQuantizer
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout, decode_records


def test_record_size_and_fields():
    """K2.5 V3 at head_dim 64: 3 norms (6 B) + 48 x 2 bits (12 B) + 16 x 4 bits (8 B) + 64 x
    3 bits (24 B) = 50 bytes, against 44 for plain K2 V3 and 56 for K3 V3."""
    layout = RecordLayout(64, 2, "mse", 3, key_outliers=16, key_outlier_bits=4)
    assert layout.size == 50 and RecordLayout(64, 2, "mse", 3).size == 44
    assert (layout.key_outlier_norm, layout.value_norm, layout.key_indices) == (2, 4, 6)
    assert (layout.key_outlier_indices, layout.value_indices) == (18, 26)
    with pytest.raises(ValueError, match="key_mode 'mse'"):
        RecordLayout(64, 3, "prod", 3, key_outliers=16, key_outlier_bits=4)


def test_split_quantizer_is_two_turboquantizers_on_the_gathered_channels():
    d, n, hk = 64, 16, 3
    chosen = channels(hk, d, n)
    split = SplitKeyQuantizer(d, 2, 4, chosen, seed=5)
    x = torch.randn(7, hk, d, generator=torch.Generator().manual_seed(1))
    got = split.dequantize(split.quantize(x))
    regular = TurboQuantizer(d - n, 2, "mse", 5, gain=SERVED_GAIN)
    outlier = TurboQuantizer(n, 4, "mse", 5, gain=SERVED_GAIN)
    for h in range(hk):
        mask = torch.zeros(d, dtype=torch.bool)
        mask[chosen[h]] = True
        for part, q in ((mask, outlier), (~mask, regular)):
            expected = q.dequantize(q.quantize(x[:, h][:, part]))
            torch.testing.assert_close(got[:, h][:, part], expected, atol=1e-5, rtol=1e-5)
    # M_h is orthogonal: inner products survive the rotation, GQA query groups included.
    rotation = split.rotation
    eye = torch.eye(d).expand(hk, d, d)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), eye, atol=1e-5, rtol=0)
    q = torch.randn(7, 3 * hk, d)
    scores = (split.rotate(q).view(7, hk, 3, d) * split.rotate(x)[:, :, None]).sum(-1)
    exact = (q.view(7, hk, 3, d) * x[:, :, None]).sum(-1)
    torch.testing.assert_close(scores, exact, atol=1e-4, rtol=1e-4)


def test_outlier_channels_beat_plain_keys_at_their_rate_when_energy_is_concentrated():
    """Keys whose energy sits in 16 of 64 channels (as on the real model): 2.5-bit split keys
    reconstruct better than plain 3-bit keys."""
    d, hk = 64, 2
    chosen = channels(hk, d, 16)
    x = torch.randn(500, hk, d, generator=torch.Generator().manual_seed(3))
    for h in range(hk):
        x[:, h, chosen[h]] *= 6
    split = SplitKeyQuantizer(d, 2, 4, chosen)
    plain = TurboQuantizer(d, 3, "mse")
    err_split = (split.dequantize(split.quantize(x)) - x).norm(dim=-1).mean()
    err_plain = (plain.dequantize(plain.quantize(x)) - x).norm(dim=-1).mean()
    assert err_split < 0.8 * err_plain


def test_non_finite_key_reads_back_as_zero_and_stays_contained():
    codec = split_codec(hk=2)
    k = torch.randn(3, 2, 64)
    v = torch.randn(3, 2, 64)
    k[1, 0, 5] = float("nan")
    k[2, 1, 7] = float("inf")
    key, _ = decode_records(codec.layout, codec.encode(k, v))
    rotated = codec.key.dequantize_rotated(key)
    assert torch.equal(rotated[1, 0], torch.zeros(64)) and torch.equal(
        rotated[2, 1], torch.zeros(64)
    )
    assert (
        torch.isfinite(rotated).all()
        and rotated[0].abs().sum() > 0
        and rotated[1, 1].abs().sum() > 0
    )


def test_codec_needs_exactly_the_layout_s_channels():
    codec = split_codec()
    with pytest.raises(ValueError, match="required for split keys"):
        LayerCodec(codec.layout, 1)
    with pytest.raises(ValueError, match="outlier_channels has shape"):
        LayerCodec(codec.layout, 1, None, channels(3, 64, 20))


# d, bits, outlier bits, n, value bits, block size, hq, hk
CASES = [
    (64, 2, 4, 16, 3, 16, 9, 3),
    (64, 3, 5, 16, 4, 32, 3, 1),
    (128, 2, 4, 32, 2, 16, 8, 2),
    (128, 3, 8, 16, 3, 16, 4, 4),
    (96, 1, 3, 24, 5, 32, 2, 1),
    (128, 4, 5, 32, 4, 16, 6, 2),  # both key parts and the values 32-aligned at 4-5 bits
    (256, 2, 4, 40, 3, 16, 4, 2),  # AVX-512's one-pass split decode: 4 chunks, parts split a vector
]


def setup(d, bits, outlier_bits, n, value_bits, block_size, hk, lens):
    codec = split_codec(d, bits, outlier_bits, n, value_bits, hk, seed=d + bits)
    cache, table, keys, values = make_cache(codec, lens, block_size, hk, seed=2)
    return codec, cache, table, keys, values


@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_reference_attention_equals_attention_over_the_reconstruction(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk
):
    """Decode through the codes (M_h-rotated queries, unrotated output) = plain softmax
    attention over the dequantized keys and values in the model's basis."""
    lens = [40, 17, 1]
    codec, cache, table, keys, values = setup(
        d, bits, outlier_bits, n, value_bits, block_size, hk, lens
    )
    query = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(4))
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = decode_attention_reference(query, cache, table, seq_lens, codec, d**-0.5)
    for b in range(len(lens)):
        k_hat = codec.key.dequantize(codec.key.quantize(keys[b]))  # [L, Hk, d]
        v_hat = codec.value.dequantize(codec.value.quantize(values[b]))
        group = hq // hk
        k_hat, v_hat = k_hat.repeat_interleave(group, 1), v_hat.repeat_interleave(group, 1)
        scores = torch.einsum("hd,lhd->hl", query[b], k_hat) * d**-0.5
        expected = torch.einsum("hl,lhd->hd", scores.softmax(-1), v_hat)
        torch.testing.assert_close(out[b], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_dequantize_split_keys_matches_reference(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk, dtype, cpu_isa
):
    codec, cache, table, _, _ = setup(d, bits, outlier_bits, n, value_bits, block_size, hk, [50])
    got_k, got_v = cpu_extension.ops().dequantize(
        cache,
        table[0],
        50,
        codec.key.regular.centroids.float(),
        codec.value.centroids.float(),
        cpu_extension.layout_fields(codec),
        d,
        dtype,
        codec.key.outlier.centroids.float(),
    )
    ref_k, ref_v = gather_context(cache, table[0], 50, codec)
    assert torch.equal(got_k, ref_k.to(dtype)) and torch.equal(got_v, ref_v.to(dtype))


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_fused_cpu_attention_reads_split_keys(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk, num_splits, cpu_isa
):
    lens = [70, 33, 5, 1]
    codec, cache, table, _, _ = setup(d, bits, outlier_bits, n, value_bits, block_size, hk, lens)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(len(lens), hq, d, generator=gen)
    out = cpu_decode.decode_attention(
        query, cache, table, seq_lens, codec, d**-0.5, num_splits=num_splits
    )
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, d**-0.5)
    torch.testing.assert_close(out, ref, **CPU_TOL)
    q_lens = [70, 20, 1, 0]  # float32 queries: every chunk runs fused
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), hq, d, generator=gen)
    args = (cache, table, starts, seq_lens, codec, d**-0.5)
    out = cpu_context.context_attention(query, *args, num_splits=num_splits)
    torch.testing.assert_close(
        out, context_attention_reference(query, None, None, *args), **CPU_TOL
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES[:4])
def test_ops_serve_split_keys_on_cpu(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk, dtype
):
    """What the backend calls: stores (the reference's, padding slots untouched), decodes and
    mixed chunks (fused C++; 16-bit chunks of DENSE_ROWS or more through the dense path)."""
    lens = [70, 33, 5, 1]
    codec, cache, table, keys, values = setup(
        d, bits, outlier_bits, n, value_bits, block_size, hk, lens
    )
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    tol = DENSE_TOL.get(dtype, dict(atol=1e-5, rtol=1e-5))
    gen = torch.Generator().manual_seed(9)
    query = torch.randn(len(lens), hq, d, generator=gen)
    out = dispatch.decode_attention(query.to(dtype), cache, table, seq_lens, codec, d**-0.5)
    ref = decode_attention_reference(query, cache, table, seq_lens, codec, d**-0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **tol)
    q_lens = [70, 20, 1, 0]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(int(starts[-1]), hq, d, generator=gen)
    args = (cache, table, starts, seq_lens, codec, d**-0.5)
    out = dispatch.context_attention(query.to(dtype), None, None, *args)
    ref = context_attention_reference(query, None, None, *args)
    torch.testing.assert_close(out.float(), ref, **tol)
    # dispatch.store_kv writes what the reference writes and skips padding slots (-1).
    k, v = torch.randn(4, hk, d, generator=gen), torch.randn(4, hk, d, generator=gen)
    slots = torch.tensor([3, -1, 17, -1])
    mine, expected = cache.clone(), cache.clone()
    dispatch.store_kv(k.to(dtype), v.to(dtype), mine, slots, codec)
    store_kv_reference(k.to(dtype), v.to(dtype), expected, slots, codec)
    assert torch.equal(mine, expected) and not torch.equal(mine, cache)


def test_calibrate_writes_a_config_the_plugin_loads(tmp_path, capsys):
    """`tq-vllm calibrate` on the embedded model: the written YAML loads through the normal
    config path and describes K2.5 V3 at 50 bytes per record."""
    from tq_vllm.plugin.config import load_config
    from tq_vllm.tools.cli import main

    out = tmp_path / "k25v3.yaml"
    assert main(["calibrate", str(out), "--tokens", "256"]) == 0
    assert "K2.5" in capsys.readouterr().out
    config = load_config({"turboquant": {"config": str(out)}})
    layouts = config.layouts(64, 30)
    assert (config.key_bits, config.value_bits, config.key_outlier_bits) == (2, 3, 4)
    assert all(lay.split_keys and lay.size == 50 for lay in layouts)
    channels = torch.tensor(config.key_outlier_channels)
    assert channels.shape == (30, 3, 16)
    assert torch.equal(channels, channels.sort(dim=-1).values)  # ascending, as written
    assert out.read_text().startswith("# Keys K2.5")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,bits,outlier_bits,n,value_bits,block_size,hq,hk", CASES)
def test_cpu_store_writes_the_reference_bytes_for_split_keys(
    d, bits, outlier_bits, n, value_bits, block_size, hq, hk, dtype, cpu_isa
):
    """The C++ store splits keys itself: the reference's records within a store's tolerance
    (cases.assert_records_close), padding slots (-1) and bytes past the record untouched, a key
    with a NaN or inf coordinate zeroed in both parts."""
    codec = split_codec(d, bits, outlier_bits, n, value_bits, hk, seed=d + bits)
    gen = torch.Generator().manual_seed(d)
    key = (torch.randn(40, hk, d, generator=gen) * 2).to(dtype)
    value = torch.randn(40, hk, d, generator=gen).to(dtype)
    key[3, 0, 5], key[7, hk - 1, 0] = float("nan"), float("inf")
    slots = torch.randperm(64, generator=gen)[:40]
    slots[[2, 11]] = -1
    shape = (64 // block_size, hk, block_size, codec.layout.record_bytes + 3)
    ref = torch.full(shape, 0xFF, dtype=torch.uint8)
    got = ref.clone()
    store_kv_reference(key, value, ref, slots, codec)
    cpu_store.store_kv(key, value, got, slots, codec)
    assert_records_close(codec, got, ref, key, value, slots)
    slot = int(slots[3])
    k, _ = decode_records(codec.layout, got[slot // block_size, 0, slot % block_size].clone())
    assert float(k.regular.norms) == 0.0 and float(k.outlier.norms) == 0.0
