import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.special import gammaln

from tq_vllm import codebook
from tq_vllm.quant.centroids import BF16_BITS, lloyd_max, unit_mse

# Lloyd-Max on the exact Beta density, solved independently with scipy:
# (d, bits) -> (largest centroid, unit-vector MSE)
REFERENCE = {
    (128, 1): (0.0707, 0.361),
    (128, 2): (0.1330, 0.116),
    (128, 3): (0.1884, 0.0340),
    (128, 4): (0.2397, 0.0093),
    (64, 3): (0.2639, 0.0334),
    (64, 4): (0.3337, 0.0091),
}


def paper_bound(bits: int) -> float:
    return math.sqrt(3) * math.pi / 2 * 4.0**-bits


@pytest.mark.parametrize("d,bits", sorted(REFERENCE))
def test_reference_numbers(d, bits):
    top, mse = REFERENCE[(d, bits)]
    c = codebook(d, bits)
    assert c.dtype == torch.float32 and c.shape == (2**bits,)
    assert torch.all(c[1:] > c[:-1])
    # The 4-bit centroids of the table are ~0.8% above the converged fixed point, which
    # test_fixed_point_by_quadrature confirms independently; 1-3 bits match to 1e-4.
    solved = lloyd_max(d, bits)
    assert solved[-1] == pytest.approx(top, rel=1e-3 if bits < 4 else 1e-2)
    got = unit_mse(d, solved)
    assert got == pytest.approx(mse, rel=0.01)
    assert got <= paper_bound(bits)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_within_paper_bound_monte_carlo(d, bits):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(20000, d, generator=gen, dtype=torch.float64)
    u /= u.norm(dim=-1, keepdim=True)
    c = torch.from_numpy(lloyd_max(d, bits))
    idx = torch.bucketize(u, (c[1:] + c[:-1]) / 2)
    mse = ((u - c[idx]) ** 2).sum(-1).mean().item()
    assert mse == pytest.approx(unit_mse(d, c.numpy()), rel=0.03)
    assert mse <= paper_bound(bits)


@pytest.mark.parametrize("d,bits", [(128, 4), (64, 2), (96, 3), (16, 5)])
def test_fixed_point_by_quadrature(d, bits):
    """Each centroid is the conditional mean of its cell under the exact coordinate density."""
    c = lloyd_max(d, bits)
    log_c = gammaln(d / 2) - 0.5 * math.log(math.pi) - gammaln((d - 1) / 2)
    f = lambda t: math.exp(log_c) * (1 - t * t) ** ((d - 3) / 2)
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
    for i in range(len(c)):
        mass = quad(f, edges[i], edges[i + 1], epsabs=1e-14)[0]
        first = quad(lambda t: t * f(t), edges[i], edges[i + 1], epsabs=1e-14)[0]
        assert first / mass == pytest.approx(c[i], abs=1e-9)


@pytest.mark.parametrize("d", [16, 48, 64, 128, 256])
def test_served_codebooks_round_to_bf16_up_to_5_bits(d):
    """The served centroids are the solver's, rounded to bf16 at up to BF16_BITS bits; that
    costs at most 0.1% of the unit MSE."""
    for bits in range(1, 9):
        solved = lloyd_max(d, bits)
        want = torch.from_numpy(solved).float()
        want = want.bfloat16().float() if bits <= BF16_BITS else want
        served = codebook(d, bits)
        assert torch.equal(served, want), bits
        assert unit_mse(d, served.double().numpy()) <= unit_mse(d, solved) * 1.001, bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_all_bits_symmetric_and_sorted(bits):
    for d in (16, 64, 96, 256):
        c = codebook(d, bits).double()
        assert torch.all(c[1:] > c[:-1])
        assert torch.allclose(c, -c.flip(0), atol=1e-7)
        assert c.abs().max() < 1


def test_disk_cache(tmp_path, monkeypatch):
    from tq_vllm.quant import centroids as module

    monkeypatch.setenv("TQ_VLLM_CACHE_DIR", str(tmp_path))
    module._centroids64.cache_clear()
    first = codebook(80, 3)
    files = list((tmp_path / "codebooks").iterdir())
    assert [f.name for f in files] == ["d80_b3.npy"]
    np.save(files[0], np.linspace(-0.5, 0.5, 8))  # a cached file is read, not recomputed
    module._centroids64.cache_clear()
    assert torch.equal(codebook(80, 3), torch.linspace(-0.5, 0.5, 8).bfloat16().float())
    module._centroids64.cache_clear()
    files[0].unlink()
    assert torch.equal(codebook(80, 3), first)
    module._centroids64.cache_clear()


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        codebook(64, bad)


@pytest.mark.parametrize("bad", [15, 0, 8.0])
def test_bad_head_dim(bad):
    with pytest.raises(ValueError, match="head_dim"):
        codebook(bad, 3)
