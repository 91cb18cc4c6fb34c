import pytest
import torch

from tq_vllm import TurboQuantizer
from tq_vllm.record.layout import RecordLayout, decode_records, encode_records


@pytest.mark.parametrize(
    "d,kb,mode,vb,size",
    [
        (128, 3, "mse", 3, 48 + 2 + 48 + 2),  # 100 bytes against bf16's 512: 5.1x
        (64, 3, "mse", 3, 24 + 2 + 24 + 2),
        (64, 4, "mse", 3, 32 + 2 + 24 + 2),
        (128, 3, "prod", 3, 32 + 16 + 4 + 48 + 2),
        (64, 1, "mse", 1, 8 + 2 + 8 + 2),
        (256, 8, "prod", 8, 224 + 32 + 4 + 256 + 2),
    ],
)
def test_sizes(d, kb, mode, vb, size):
    layout = RecordLayout(d, kb, mode, vb)
    assert layout.size == layout.record_bytes == size
    assert layout.compression_ratio() == pytest.approx(4 * d / size)


@pytest.mark.parametrize("mode", ["mse", "prod"])
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_round_trip(mode, d):
    layout = RecordLayout(d, 4, mode, 2).padded(RecordLayout(d, 4, mode, 2).size + 3)
    kq = TurboQuantizer(head_dim=d, bits=4, mode=mode, seed=0)
    vq = TurboQuantizer(head_dim=d, bits=2, mode="mse", seed=0)
    k, v = torch.randn(2, 5, d), torch.randn(2, 5, d)
    kc, vc = kq.quantize(k), vq.quantize(v)
    records = encode_records(layout, kc, vc)
    assert records.shape == (2, 5, layout.record_bytes)
    assert torch.all(records[..., layout.size :] == 0)
    kd, vd = decode_records(layout, records)
    assert torch.equal(kd.indices, kc.indices) and torch.equal(kd.norms, kc.norms)
    assert torch.equal(vd.indices, vc.indices) and torch.equal(vd.norms, vc.norms)
    if mode == "prod":
        assert torch.equal(kd.signs, kc.signs)
        assert torch.equal(kd.residual_norms, kc.residual_norms)


def test_norms_at_fixed_offsets():
    layout = RecordLayout(64, 3, "prod", 3)
    assert (layout.key_norm, layout.key_residual_norm, layout.value_norm) == (0, 2, 4)
    assert layout.key_indices == 6
    mse = RecordLayout(64, 3, "mse", 3)
    assert (mse.key_norm, mse.value_norm, mse.key_indices) == (0, 2, 4)


def test_cannot_shrink():
    with pytest.raises(ValueError, match="cannot pad"):
        RecordLayout(64, 3, "mse", 3).padded(10)
