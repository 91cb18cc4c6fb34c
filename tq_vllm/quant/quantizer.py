"""TurboQuant_mse and TurboQuant_prod in plain PyTorch: the reference math.

A vector x of head_dim d is stored as a norm and the coordinates of the rotated unit vector
u = R x / ||x||, each replaced by the index of its nearest Lloyd-Max centroid; it reads back as
n R^T c[idx]. In mse mode the stored norm n = ||x|| g carries a gain g, by one of two rules
(GAINS):
- "least_squares" (the default): g = <u, c[idx]> / ||c[idx]||^2, the g that minimises
  ||u - g c[idx]||, so the reconstruction error is never above plain Lloyd-Max (g = 1); at
  d=128 the unit vector's error is 0.1151 at 2 bits against 0.1159, 0.0334 against 0.0339 at 3.
- "norm" (norm correction, as upstream vLLM does): g = 1 / ||c[idx]||, so the reconstruction
  has exactly the input's norm. Its error is above Lloyd-Max's at 1-2 bits (0.1187 at d=128,
  2 bits), yet served perplexity measured within noise of least squares at 4-6 bits and 1-4%
  better at 2-3 bits (values shrunk by least squares soften every layer's output): the paged
  records use it (codec.py).
Prod mode keeps n = ||x||: its mse stage gets bits - 1 bits and the residual
r' = R x - n c[idx] (rotated domain) keeps one sign bit per coordinate of S r' plus its norm: the
QJL sketch, which makes inner products unbiased:
    <q, x> ~ n <q', c[idx]> + ||r'|| sqrt(pi/2) / d <S q', sign(S r')>,   q' = R q.
Norms are stored as float16 (saturating at 65504); the codes hold them already rounded, so
what this module estimates is exactly what a paged record reproduces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tq_vllm.quant.centroids import check_bits, check_head_dim, codebook
from tq_vllm.quant.rotation import qjl_matrix, rotation_matrix, rows_times
from tq_vllm.record.packing import (
    chunk_table,
    pack_indices,
    pack_signs,
    packed_bytes,
    unpack_chunks,
    unpack_indices,
    unpack_signs,
)

MODES = ("mse", "prod")
GAINS = ("least_squares", "norm")
SERVED_GAIN = "norm"  # what the paged records (and the C++ / Triton stores) use
FP16_MAX = 65504.0


def to_fp16_norm(n: torch.Tensor) -> torch.Tensor:
    """A norm as vLLM's cache stores it: fp16, saturated at its largest finite value. A
    non-finite norm (a NaN or inf coordinate) is stored as 0: the record then reads back as
    the zero vector, so the bad token cannot spread NaN through 0-weight products (0 * NaN)."""
    return torch.where(n.isfinite(), n.clamp(max=FP16_MAX), 0.0).to(torch.float16)


@dataclass
class TurboCodes:
    """Quantized vectors: leading shape [...] of the input, one code per vector."""

    indices: torch.Tensor  # uint8 [..., packed_bytes(d, mse_bits)] (last dim 0 if mse_bits == 0)
    norms: torch.Tensor  # float16 [...]
    signs: torch.Tensor | None = None  # uint8 [..., packed_bytes(d, 1)], prod mode
    residual_norms: torch.Tensor | None = None  # float16 [...], prod mode

    @property
    def shape(self) -> torch.Size:
        return self.norms.shape


def check_mode(mode: str, name: str = "mode") -> None:
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")


class TurboQuantizer:
    """TurboQuant for vectors of length head_dim at `bits` bits per coordinate.

    >>> tq = TurboQuantizer(head_dim=128, bits=3, mode="prod", seed=0)
    >>> codes = tq.quantize(torch.randn(10, 128))
    >>> tq.inner_product(torch.randn(4, 128), codes).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        head_dim: int,
        bits: int,
        mode: str = "prod",
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        gain: str = "least_squares",
    ) -> None:
        check_head_dim(head_dim)
        check_bits(bits)
        check_mode(mode)
        if gain not in GAINS:
            raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.head_dim, self.bits, self.mode, self.seed = head_dim, bits, mode, seed
        self.dtype, self.gain = dtype, gain
        self.mse_bits = bits if mode == "mse" else bits - 1
        self.rotation = rotation_matrix(head_dim, seed, device)
        if self.mse_bits > 0:
            self.centroids = codebook(head_dim, self.mse_bits).to(device)
        else:  # 1-bit prod: the whole vector goes through QJL
            self.centroids = torch.zeros(1, device=device)
        self.boundaries = (self.centroids[1:] + self.centroids[:-1]) / 2
        if self.mse_bits > 0:
            self._chunk_table = chunk_table(self.centroids, self.mse_bits)
        self.qjl = qjl_matrix(head_dim, seed, device) if mode == "prod" else None

    # -- sizes ------------------------------------------------------------------------------
    @property
    def index_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.mse_bits)

    @property
    def sign_bytes(self) -> int:
        return packed_bytes(self.head_dim, 1) if self.mode == "prod" else 0

    @property
    def bytes_per_vector(self) -> int:
        norms = 2 if self.mode == "mse" else 4
        return self.index_bytes + self.sign_bytes + norms

    @property
    def bits_per_value(self) -> float:
        return 8 * self.bytes_per_vector / self.head_dim

    @property
    def compression_ratio(self) -> float:
        """Size of the vector in fp16 over its code, norms and padding included."""
        return 2 * self.head_dim / self.bytes_per_vector

    # -- math -------------------------------------------------------------------------------
    def _check_vectors(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"{name} must have last dimension head_dim={self.head_dim}, got shape "
                f"{tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        return x.to(device=self.rotation.device, dtype=torch.float32)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return rows_times(x, self.rotation.T)

    def quantize(self, x: torch.Tensor, check: bool = True) -> TurboCodes:
        """Codes for x [..., head_dim].

        check=False skips the input checks (the serving path: a non-finite vector then gets
        a zero norm and reads back as zeros; only its own code changes).
        """
        x = self._check_vectors(x, "x") if check else x.float()
        y = self.rotate(x)
        norms = torch.linalg.vector_norm(x, dim=-1)
        u = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(1e-30)
        idx = torch.bucketize(u, self.boundaries)
        indices = pack_indices(idx, self.mse_bits) if self.mse_bits else idx[..., :0].byte()
        if self.mode == "mse":
            norms = self._gain_norms(norms, u, idx)
        codes = TurboCodes(indices=indices, norms=to_fp16_norm(norms))
        if self.mode == "prod":
            residual = y - codes.norms.float().unsqueeze(-1) * self.centroids[idx]
            codes.signs = pack_signs(residual @ self.qjl.T)
            codes.residual_norms = to_fp16_norm(torch.linalg.vector_norm(residual, dim=-1))
        return codes

    def _gain_norms(self, norms: torch.Tensor, u: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """n = ||x|| g (module docstring); a zero code (impossible with a symmetric codebook,
        but never divide by it) keeps g = 1. "norm" divides by ||c[idx]|| as the fused stores
        do (their norms in another summation order: within one fp16 ulp)."""
        c = self.centroids[idx]
        if self.gain == "norm":
            cn = torch.linalg.vector_norm(c, dim=-1)
            return norms / torch.where(cn > 0, cn, 1.0)
        cc = (c * c).sum(-1)
        return torch.where(cc > 0, norms * (u * c).sum(-1) / cc.where(cc > 0, 1.0), norms)

    def dequantize_rotated(self, codes: TurboCodes) -> torch.Tensor:
        """R x_hat: the reconstruction in the rotated domain, float32 [..., head_dim]."""
        y = self._mse_rotated(codes)
        if self.mode == "prod":
            signs = unpack_signs(codes.signs.to(self.rotation.device), self.head_dim)
            y = y + self._qjl_scale(codes).unsqueeze(-1) * (signs @ self.qjl)
        return y

    def _mse_rotated(self, codes: TurboCodes) -> torch.Tensor:
        """n c[idx] in the rotated domain, float32 [..., head_dim]."""
        if self.mse_bits == 0:
            return torch.zeros(*codes.shape, self.head_dim, device=self.rotation.device)
        packed = codes.indices.to(self.rotation.device)
        norms = codes.norms.float().to(packed.device).unsqueeze(-1)
        if self.head_dim % 8:
            return norms * self.centroids[unpack_indices(packed, self.mse_bits, self.head_dim)]
        # One table lookup decodes a whole chunk of indices: ~3x faster than unpacking.
        chunks = unpack_chunks(packed, self.mse_bits).reshape(-1)
        values = self._chunk_table.index_select(0, chunks)  # faster than advanced indexing
        return norms * values.reshape(*packed.shape[:-1], self.head_dim)

    def _qjl_scale(self, codes: TurboCodes) -> torch.Tensor:
        rn = codes.residual_norms.float().to(self.rotation.device)
        return rn * math.sqrt(math.pi / 2) / self.head_dim

    def dequantize(self, codes: TurboCodes) -> torch.Tensor:
        """Reconstruction [..., head_dim] in self.dtype (unbiased in prod mode)."""
        return (self.dequantize_rotated(codes) @ self.rotation).to(self.dtype)

    def inner_product(self, q: torch.Tensor, codes: TurboCodes) -> torch.Tensor:
        """Estimated <q_i, x_j>: [num_queries, num_vectors] for q [num_queries, head_dim]."""
        q = self._check_vectors(q, "q")
        if q.dim() != 2:
            raise ValueError(f"q must be [num_queries, head_dim], got shape {tuple(q.shape)}")
        q_rot = self.rotate(q)
        y = self._mse_rotated(codes).reshape(-1, self.head_dim)
        scores = q_rot @ y.T
        if self.mode == "prod":
            signs = unpack_signs(codes.signs.to(q.device), self.head_dim).reshape(-1, self.head_dim)
            scale = self._qjl_scale(codes).reshape(-1)
            scores = scores + (q_rot @ self.qjl.T) @ signs.T * scale
        return scores.to(self.dtype)
