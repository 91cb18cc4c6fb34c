"""The exact window on the CPU (window/exact.cpp): its exact part and merge in one op per layer
and step, reading the ring and the step's own keys and values where they lie (instead of
exact.exact_merge_reference's gathers and dozen PyTorch calls), and the ring's write."""

from __future__ import annotations

import torch

from tq_vllm.kernels.cpu_extension import ops
from tq_vllm.kernels.window.exact import ExactIndex


def exact_merge(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    window: int,
    scale: float,
    rows: torch.Tensor | None,
    compressed: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """exact.exact_merge_reference, fused: [T', Hq, d] in query's dtype."""
    return ops().exact_merge(
        query,
        key,
        value,
        ring,
        rows,
        index.segment_starts,
        index.visible,
        index.row_ring,
        index.ring_reads,
        window,
        scale,
        compressed.float().contiguous(),
        lse.float().contiguous(),
    )


def write_ring(
    ring: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: ExactIndex
) -> None:
    """exact.write_ring_reference in one op."""
    ops().write_ring(ring, key, value, index.write_tokens, index.write_blocks, index.write_slots)
