"""Uniform per-vector value quantization with an fp16 scale and zero point.

This is how upstream vLLM's `turboquant_*bit_nc` presets store values (not rotated, 2^b evenly
spaced levels between the vector's min and max); tq_vllm offers it as `value_mode: uniform` so
that the eval can compare against that baseline through the same engine. CPU (PyTorch) path
only: the Triton and C++ kernels read Lloyd-Max value records.

    scale = (max(v) - min(v)) / (2^b - 1),  zero = min(v),  idx = round((v - zero) / scale)
    v_hat = zero + idx * scale

Scale and zero are rounded to fp16 before the indices are computed, so the reconstruction error
of every coordinate is at most scale / 2 plus the rounding of zero (and the top level's clamp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tq_vllm.quant.centroids import check_bits
from tq_vllm.quant.quantizer import FP16_MAX
from tq_vllm.record.packing import pack_indices, packed_bytes, unpack_indices

# The smallest normal fp16: a constant vector then gets indices 0 and v_hat = zero.
MIN_SCALE = float(torch.finfo(torch.float16).tiny)


@dataclass
class UniformCodes:
    indices: torch.Tensor  # uint8 [..., packed_bytes(d, bits)]
    scale: torch.Tensor  # float16 [...]
    zero: torch.Tensor  # float16 [...]

    @property
    def shape(self) -> torch.Size:
        return self.scale.shape


class UniformQuantizer:
    def __init__(self, head_dim: int, bits: int) -> None:
        check_bits(bits)
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
        self.head_dim, self.bits = head_dim, bits
        self.levels = (1 << bits) - 1

    @property
    def index_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.bits)

    def quantize(self, x: torch.Tensor) -> UniformCodes:
        """x [..., head_dim] -> codes. A non-finite vector reads back as zeros."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(
                f"x must have last dimension head_dim={self.head_dim}, got {tuple(x.shape)}"
            )
        x = x.float()
        # A vector with a NaN or inf coordinate is stored as the zero vector (zero point 0,
        # indices 0), as Lloyd-Max records store a 0 norm: a NaN scale or zero point would
        # spread through 0-weight products to every query that reads the token.
        finite = x.isfinite().all(dim=-1)
        x = torch.where(finite.unsqueeze(-1), x, 0.0)
        lo, hi = x.amin(dim=-1), x.amax(dim=-1)
        zero = lo.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
        scale = ((hi - lo) / self.levels).clamp(MIN_SCALE, FP16_MAX).to(torch.float16)
        q = (x - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)
        idx = torch.floor(q + 0.5).nan_to_num(0.0).clamp(0, self.levels).long()
        return UniformCodes(pack_indices(idx, self.bits), scale, zero)

    def dequantize(self, codes: UniformCodes) -> torch.Tensor:
        """codes -> float32 [..., head_dim]."""
        idx = unpack_indices(codes.indices, self.bits, self.head_dim).float()
        return codes.zero.float().unsqueeze(-1) + idx * codes.scale.float().unsqueeze(-1)
