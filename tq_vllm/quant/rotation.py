"""Seeded random rotations and the QJL projection.

Every process (API server, engine core, each tensor-parallel worker) must build bit-identical
matrices from the config's seed, so they come from a CPU torch.Generator in float64 and are
only then cast and moved: device RNGs and reduced-precision QR differ across machines.
"""

from __future__ import annotations

import functools

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def rows_times(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [..., n] @ m [n, k] as one 2-d matrix product over x's rows, the same numbers. Why:
    on the CPU, x @ m with a strided 3-d x (queries sliced from the fused qkv projection) runs
    as a batched product of [H, n] x [n, k] blocks against m expanded per token: 7x slower for
    a 2,048-token chunk's queries in bf16, 2x in float32."""
    return (x.reshape(-1, x.shape[-1]) @ m).view(*x.shape[:-1], m.shape[-1])


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1), n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=64)
def _rotation64(head_dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if is_power_of_two(head_dim):
        # Randomized Hadamard R = H D / sqrt(d): D flips signs, H spreads every coordinate.
        signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.int64) * 2 - 1
        return hadamard(head_dim) * signs.to(torch.float64) / head_dim**0.5
    g = torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))  # sign fix makes Q Haar-distributed


def rotation_matrix(
    head_dim: int, seed: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthogonal R [head_dim, head_dim] (float32): rotated u = x @ R.T, x = u @ R."""
    return _rotation64(head_dim, seed).to(device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=64)
def _qjl64(head_dim: int, seed: int) -> torch.Tensor:
    # A different stream from the rotation's, so R and S are independent for the same seed.
    gen = torch.Generator().manual_seed(seed ^ 0x5EED_0F_51)
    return torch.randn(head_dim, head_dim, generator=gen, dtype=torch.float64)


def qjl_matrix(head_dim: int, seed: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Gaussian S [head_dim, head_dim] (float32) of the 1-bit QJL residual sketch."""
    return _qjl64(head_dim, seed).to(device=device, dtype=torch.float32)
