"""Keys with outlier channels: the paper's fractional bit rates (2.5, 3.5 bits), in PyTorch.

A few key channels carry most of the energy (on SmolLM2-135M the top 8 of 64 hold 61%). Per
layer and KV head, a fixed set of n channels (chosen on calibration text, `tq-vllm calibrate`)
is quantized by its own TurboQuantizer (mse) at outlier_bits, the other d - n channels by
another at `bits`; each part has its own rotation and norm. The key's rotated domain is the two
rotated parts side by side, regular first:

    M_h x = [R_reg x[regular_h], R_out x[outlier_h]],   M_h orthogonal [d, d], per KV head h,

so attention works as with plain keys: queries rotated by M_h, scores against
[n_reg c_reg[idx_reg], n_out c_out[idx_out]] straight from the codes. Only rotating needs the
head; the codes decode the same way for every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tq_vllm.quant.centroids import MIN_HEAD_DIM
from tq_vllm.quant.quantizer import SERVED_GAIN, TurboCodes, TurboQuantizer


@dataclass
class SplitCodes:
    regular: TurboCodes  # the d - n regular channels, at `bits`
    outlier: TurboCodes  # the n outlier channels, at outlier_bits

    @property
    def shape(self) -> torch.Size:
        return self.regular.shape


def check_channels(channels: torch.Tensor, head_dim: int) -> None:
    """channels: int [Hk, n], each row n distinct channel indices of one KV head."""
    if channels.dim() != 2 or channels.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"outlier channels must be an integer [num_kv_heads, n] tensor, got {channels.dtype} "
            f"of shape {tuple(channels.shape)}"
        )
    n = channels.shape[1]
    if not MIN_HEAD_DIM <= n <= head_dim - MIN_HEAD_DIM:
        raise ValueError(
            f"{n} outlier channels per head: each part needs at least {MIN_HEAD_DIM} of the "
            f"{head_dim} channels"
        )
    if bool((channels < 0).any()) or bool((channels >= head_dim).any()):
        raise ValueError(f"outlier channel indices must lie in 0..{head_dim - 1}")
    if bool((channels.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("a KV head lists the same outlier channel twice")


class SplitKeyQuantizer:
    """Keys [..., Hk, d] -> SplitCodes; outlier channels `channels` [Hk, n] at outlier_bits."""

    def __init__(
        self,
        head_dim: int,
        bits: int,
        outlier_bits: int,
        channels: torch.Tensor,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        check_channels(channels, head_dim)
        n = channels.shape[1]
        self.head_dim, self.num_regular = head_dim, head_dim - n
        self.regular = TurboQuantizer(head_dim - n, bits, "mse", seed, device, gain=SERVED_GAIN)
        self.outlier = TurboQuantizer(n, outlier_bits, "mse", seed, device, gain=SERVED_GAIN)
        chosen = torch.zeros(channels.shape[0], head_dim, dtype=torch.int64)
        chosen.scatter_(1, channels.long().cpu(), 1)
        # Per head: its regular channels in ascending order, then its outlier channels.
        self.order = chosen.argsort(dim=1, stable=True).to(device)  # [Hk, d]
        block = torch.block_diag(self.regular.rotation.cpu(), self.outlier.rotation.cpu())
        permutations = torch.eye(head_dim)[self.order.cpu()]  # P_h x = x[order_h]
        self.rotation = (block @ permutations).to(device)  # M_h, float32 [Hk, d, d]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., Hk * G, d] (G >= 1 rows per KV head, e.g. a GQA group of queries) -> M_h x,
        float32."""
        hk, d = self.rotation.shape[0], self.head_dim
        grouped = x.float().reshape(*x.shape[:-2], hk, x.shape[-2] // hk, d)
        rotated = torch.einsum("...hgd,hed->...hge", grouped, self.rotation)
        return rotated.reshape(x.shape).contiguous()  # einsum may leave heads strided

    def quantize(self, x: torch.Tensor) -> SplitCodes:
        """Codes for keys x [..., Hk, d]. A key with a NaN or inf coordinate gets zero norms in
        both parts (it reads back as the zero vector, like a plain key)."""
        x = x.float()
        parts = x.gather(-1, self.order.expand(x.shape))
        codes = SplitCodes(
            self.regular.quantize(parts[..., : self.num_regular], check=False),
            self.outlier.quantize(parts[..., self.num_regular :], check=False),
        )
        bad = ~x.isfinite().all(dim=-1)
        for part in (codes.regular, codes.outlier):
            part.norms = part.norms.masked_fill(bad, 0.0)
        return codes

    def dequantize_rotated(self, codes: SplitCodes) -> torch.Tensor:
        """M_h x_hat, float32 [..., d]: the two parts' reconstructions, regular first."""
        return torch.cat(
            [
                self.regular.dequantize_rotated(codes.regular),
                self.outlier.dequantize_rotated(codes.outlier),
            ],
            dim=-1,
        )

    def dequantize(self, codes: SplitCodes) -> torch.Tensor:
        """x_hat [..., Hk, d], float32, in the model's channel order."""
        return torch.einsum("...he,hed->...hd", self.dequantize_rotated(codes), self.rotation)
