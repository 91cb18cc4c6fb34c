"""Lloyd-Max codebooks for one coordinate of a uniform random unit vector.

A coordinate t of u ~ Uniform(S^{d-1}) has density
    f(t) = C_d (1 - t^2)^((d-3)/2) on [-1, 1],   C_d = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)),
i.e. t = 2B - 1 with B ~ Beta((d-1)/2, (d-1)/2). Both moments Lloyd-Max needs on an interval
have closed forms: the mass from the Beta CDF, and the first moment from
    d/dt (1 - t^2)^((d-1)/2) = -(d-1) t (1 - t^2)^((d-3)/2),
so no numerical integration is needed and 8-bit codebooks converge in well under a second.

Codebooks are computed once per (head_dim, bits) and cached on disk (TQ_VLLM_CACHE_DIR, default
~/.cache/tq_vllm) so that no process start pays for them twice.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
import torch

MIN_HEAD_DIM = 16
MAX_BITS = 8


def check_bits(bits: int, name: str = "bits", low: int = 1) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {low}..{MAX_BITS}, got {bits!r}")


def check_head_dim(head_dim: int) -> None:
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < MIN_HEAD_DIM:
        raise ValueError(f"head_dim must be an integer >= {MIN_HEAD_DIM}, got {head_dim!r}")


def cache_dir() -> Path:
    return Path(os.environ.get("TQ_VLLM_CACHE_DIR", Path.home() / ".cache" / "tq_vllm"))


def _density(t: np.ndarray, d: int) -> np.ndarray:
    from scipy.special import gammaln

    log_c = gammaln(d / 2.0) - 0.5 * math.log(math.pi) - gammaln((d - 1) / 2.0)
    return math.exp(log_c) * np.power(np.clip(1.0 - t**2, 0.0, 1.0), (d - 3) / 2.0)


def _interval_moments(edges: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Mass and first moment of the coordinate density on each interval [edges[i], edges[i+1]]."""
    from scipy.special import betainc, gammaln

    a = (d - 1) / 2.0
    cdf = betainc(a, a, np.clip((edges + 1.0) / 2.0, 0.0, 1.0))
    log_c = gammaln(d / 2.0) - 0.5 * math.log(math.pi) - gammaln((d - 1) / 2.0)
    g = np.power(np.clip(1.0 - edges**2, 0.0, 1.0), (d - 1) / 2.0)
    return np.diff(cdf), math.exp(log_c) / (d - 1) * -np.diff(g)


def _lloyd_step(c: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """One Lloyd-Max update T(c) and its tridiagonal Jacobian dT/dc as (lower, diag, upper)."""
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2.0, [1.0]])
    mass, first = _interval_moments(edges, d)
    mass = np.maximum(mass, 1e-300)
    t = first / mass
    f = _density(edges, d)
    d_low = f[:-1] * (t - edges[:-1]) / mass  # dT_i / d(left edge of cell i)
    d_high = f[1:] * (edges[1:] - t) / mass  # dT_i / d(right edge of cell i)
    d_low[0] = 0.0  # the outer edges are fixed at -1 and 1
    d_high[-1] = 0.0
    return t, np.stack([0.5 * d_low, 0.5 * (d_low + d_high), 0.5 * d_high])


def lloyd_max(head_dim: int, bits: int, tol: float = 1e-10) -> np.ndarray:
    """Sorted float64 centroids of the 2^bits-level Lloyd-Max quantizer for head_dim.

    Plain Lloyd iterations converge linearly and need ~10^5 steps at 8 bits; Newton's method
    on the fixed point T(c) = c (the Jacobian is tridiagonal) converges in a few steps from a
    rough start. The residual bottoms out near 1e-12 (cancellation in the moments), so the
    default tolerance sits above that floor.
    """
    from scipy.linalg import solve_banded
    from scipy.special import ndtri

    check_head_dim(head_dim)
    check_bits(bits)
    d, levels = head_dim, 1 << bits
    # Start from the Gaussian approximation N(0, 1/d) at evenly spaced quantiles.
    c = ndtri((np.arange(levels) + 0.5) / levels) / math.sqrt(d)
    for _ in range(1_000):
        t, (lower, diag, upper) = _lloyd_step(c, d)
        residual = t - c
        if np.max(np.abs(residual)) < tol:
            break
        banded = np.zeros((3, levels))
        banded[0, 1:] = upper[:-1]
        banded[1] = diag - 1.0
        banded[2, :-1] = lower[1:]
        step = solve_banded((1, 1), banded, -residual)
        new = c + step
        if not np.all(np.diff(new) > 0) or np.max(np.abs(new)) >= 1.0:
            new = t  # Newton left the feasible region: fall back to a Lloyd step
        c = (new - new[::-1]) / 2.0  # the density is symmetric; keep rounding from drifting
    return c


def unit_mse(head_dim: int, centroids: np.ndarray) -> float:
    """E||u - u_hat||^2 for a uniform unit vector quantized coordinate-wise with `centroids`."""
    c = np.asarray(centroids, dtype=np.float64)
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2.0, [1.0]])
    mass, first = _interval_moments(edges, head_dim)
    # Per coordinate: E[t^2] - 2 sum c_i E[t; cell i] + sum c_i^2 P_i, with E[t^2] = 1/d.
    per_coord = 1.0 / head_dim - 2.0 * np.sum(c * first) + np.sum(c * c * mass)
    return float(head_dim * per_coord)


@functools.cache
def _centroids64(head_dim: int, bits: int) -> np.ndarray:
    path = cache_dir() / "codebooks" / f"d{head_dim}_b{bits}.npy"
    try:
        c = np.load(path)
        if c.shape == (1 << bits,):
            return c
    except (OSError, ValueError):
        pass
    c = lloyd_max(head_dim, bits)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, c)
        os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
    except OSError:
        pass  # a read-only home only costs recomputation
    return c


# Up to this width the centroids are rounded to bf16: the unit MSE rises by under 0.1%
# (head_dim 16-256; 0.2-0.35% at 6 bits, 1-4% at 7-8, so those stay float32), and the AVX2
# fused attention then looks up two bytes per value instead of four (kernels/csrc/row_decoder.h).
BF16_BITS = 5


def codebook(head_dim: int, bits: int) -> torch.Tensor:
    """Sorted Lloyd-Max centroids for one coordinate of a random unit vector in R^head_dim,
    float32 (values bf16-exact up to BF16_BITS)."""
    check_head_dim(head_dim)
    check_bits(bits)
    c = torch.from_numpy(_centroids64(head_dim, bits).copy()).to(torch.float32)
    return c.bfloat16().float() if bits <= BF16_BITS else c
