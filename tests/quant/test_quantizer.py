import math
import subprocess
import sys

import pytest
import torch

from tq_vllm import TurboQuantizer
from tq_vllm.quant.centroids import lloyd_max, unit_mse


def unit_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_mode_distortion(d, bits):
    tq = TurboQuantizer(head_dim=d, bits=bits, mode="mse", seed=1)
    x = unit_vectors(4000, d, 2) * 7.0
    err = ((tq.dequantize(tq.quantize(x)) - x) ** 2).sum(-1).mean().item() / 49.0
    assert err == pytest.approx(unit_mse(d, lloyd_max(d, bits)), rel=0.08)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_unbiased_and_variance_bound(bits):
    d, trials = 64, 1500
    x = unit_vectors(1, d, 3)
    q = unit_vectors(1, d, 4)
    exact = (q @ x.T).item()
    errors = []
    for seed in range(trials):
        tq = TurboQuantizer(head_dim=d, bits=bits, mode="prod", seed=seed)
        errors.append(tq.inner_product(q, tq.quantize(x)).item() - exact)
    errors = torch.tensor(errors, dtype=torch.float64)
    standard_error = errors.std() / math.sqrt(trials)
    assert abs(errors.mean()) < 3 * standard_error
    bound = math.sqrt(3) * math.pi**2 / d * 4.0**-bits  # ||q|| = ||x|| = 1
    assert (errors**2).mean() < bound


@pytest.mark.parametrize("mode", ["mse", "prod"])
def test_inner_product_matches_dequantize(mode):
    tq = TurboQuantizer(head_dim=128, bits=3, mode=mode, seed=5)
    x = torch.randn(2, 7, 128)
    q = torch.randn(4, 128)
    codes = tq.quantize(x)
    est = tq.inner_product(q, codes)
    assert est.shape == (4, 14)
    ref = q @ tq.dequantize(codes).reshape(14, 128).T
    assert torch.allclose(est, ref, atol=1e-4, rtol=1e-4)


def test_codes_shapes_and_sizes():
    tq = TurboQuantizer(head_dim=128, bits=3, mode="prod")
    codes = tq.quantize(torch.randn(3, 5, 128))
    assert codes.shape == (3, 5)
    assert codes.indices.shape == (3, 5, 32) and codes.indices.dtype == torch.uint8
    assert codes.signs.shape == (3, 5, 16)
    assert codes.norms.dtype == codes.residual_norms.dtype == torch.float16
    assert tq.bytes_per_vector == 32 + 16 + 4
    assert tq.bits_per_value == pytest.approx(3.25)
    assert tq.compression_ratio == pytest.approx(256 / 52)
    mse = TurboQuantizer(head_dim=64, bits=4, mode="mse")
    assert mse.bits_per_value == pytest.approx(4.25)
    assert mse.compression_ratio == pytest.approx(128 / 34)


def test_one_bit_prod_is_pure_qjl():
    tq = TurboQuantizer(head_dim=64, bits=1, mode="prod")
    codes = tq.quantize(torch.randn(10, 64))
    assert codes.indices.shape == (10, 0)
    assert tq.dequantize(codes).shape == (10, 64)


def test_zero_and_large_vectors():
    tq = TurboQuantizer(head_dim=64, bits=4, mode="mse")
    x = torch.zeros(2, 64)
    x[1] = 5000.0  # norm 40000, near the float16 limit
    y = tq.dequantize(tq.quantize(x))
    assert torch.equal(y[0], torch.zeros(64))
    assert torch.isfinite(y).all()
    assert (y[1] - x[1]).norm() / x[1].norm() < 0.15


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_mse_norm_correction_keeps_input_norms(bits):
    """gain "norm" stores ||x|| / ||c[idx]||: the reconstruction has the input's norm, up to
    the fp16 rounding of the stored norm (relative 2^-11)."""
    tq = TurboQuantizer(head_dim=64, bits=bits, mode="mse", seed=2, gain="norm")
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(9)) * 3
    x[0] = 0.0
    codes = tq.quantize(x)
    got = tq.dequantize(codes).norm(dim=-1)
    want = x.norm(dim=-1)
    assert float(got[0]) == 0.0
    torch.testing.assert_close(got, want, rtol=2**-11, atol=0)


@pytest.mark.parametrize("d", [64, 128])
def test_least_squares_gain_never_above_lloyd_max(d):
    """The public mse quantizer's default gain minimises each vector's error over the gain, so
    at every width its error is at most plain Lloyd-Max's (gain 1), fp16 rounding of the norm
    aside; norm correction is above Lloyd-Max at 1-2 bits."""
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(3)) * 2
    for bits in range(1, 9):
        tq = TurboQuantizer(head_dim=d, bits=bits, mode="mse", seed=1)
        assert tq.gain == "least_squares"
        u = tq.rotate(x) / x.norm(dim=-1, keepdim=True)
        lloyd_max = (
            tq.centroids[torch.bucketize(u, tq.boundaries)]
            @ tq.rotation
            * x.norm(dim=-1, keepdim=True)
        )
        err = lambda y: float(((y - x) ** 2).sum() / (x**2).sum())  # noqa: E731
        least_squares = err(tq.dequantize(tq.quantize(x)))
        norm = TurboQuantizer(head_dim=d, bits=bits, mode="mse", seed=1, gain="norm")
        corrected = err(norm.dequantize(norm.quantize(x)))
        assert least_squares <= err(lloyd_max) * (1 + 1e-3), bits
        assert least_squares <= corrected * (1 + 1e-3), bits
        if bits <= 2:
            assert corrected > err(lloyd_max), bits


def test_gain_is_checked():
    with pytest.raises(ValueError, match="gain must be one of"):
        TurboQuantizer(head_dim=64, bits=3, mode="mse", gain="unit")


def test_prod_norms_are_not_corrected():
    """Prod mode stores ||x|| itself (the unbiased estimator needs it)."""
    tq = TurboQuantizer(head_dim=64, bits=3, mode="prod", seed=2)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(tq.quantize(x).norms, x.norm(dim=-1).half())


def test_output_dtype_and_device_keywords():
    tq = TurboQuantizer(head_dim=64, bits=2, mode="mse", device="cpu", dtype=torch.bfloat16)
    assert tq.dequantize(tq.quantize(torch.randn(3, 64))).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"head_dim": 8}, "head_dim"),
        ({"mode": "fast"}, "mode"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {"head_dim": 64, "bits": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        TurboQuantizer(**args)


def test_bad_inputs():
    tq = TurboQuantizer(head_dim=64, bits=3)
    with pytest.raises(ValueError, match="last dimension head_dim=64"):
        tq.quantize(torch.randn(3, 65))
    bad = torch.randn(3, 64)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        tq.quantize(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        tq.quantize(bad)
    codes = tq.quantize(torch.randn(3, 64))
    with pytest.raises(ValueError, match="q must have last dimension"):
        tq.inner_product(torch.randn(2, 32), codes)


SCRIPT = """
import hashlib, torch
from tq_vllm import TurboQuantizer
torch.manual_seed(123)
x = torch.randn(64, {d})
h = hashlib.sha256()
for mode in ("mse", "prod"):
    tq = TurboQuantizer(head_dim={d}, bits=3, mode=mode, seed=7)
    c = tq.quantize(x)
    for t in (c.indices, c.norms, c.signs, c.residual_norms, tq.rotation):
        if t is not None:
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


@pytest.mark.parametrize("d", [64, 96])
def test_same_seed_same_codes_across_processes(d):
    runs = [
        subprocess.run(
            [sys.executable, "-c", SCRIPT.format(d=d)], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0].strip()) == 64
