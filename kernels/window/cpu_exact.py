"""The exact window's exact part and merge on the CPU (window/exact.cpp): one op per layer and
step instead of exact.exact_merge_reference's dozen PyTorch calls."""

from __future__ import annotations

import torch

from tq_vllm.kernels.cpu_extension import ops


def exact_merge(
    query: torch.Tensor,
    timeline: torch.Tensor,
    window_start: torch.Tensor,
    visible: torch.Tensor,
    window: int,
    scale: float,
    compressed: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """exact.exact_merge_reference, fused: [T, Hq, d] in query's dtype."""
    return ops().exact_merge(
        query.contiguous(),
        timeline.contiguous(),
        window_start.long().contiguous(),
        visible.long().contiguous(),
        window,
        scale,
        compressed.float().contiguous(),
        lse.float().contiguous(),
    )
