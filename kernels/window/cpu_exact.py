"""The exact window on the CPU (window/exact.cpp): its exact part and merge in one op per layer
and step, reading the ring and the step's own keys and values where they lie (instead of
exact.exact_merge_reference's gathers and dozen PyTorch calls), and the ring's write.
decode_step: a whole decode step's attention in two ops."""

from __future__ import annotations

import torch

from tq_vllm.kernels.cpu_extension import ops
from tq_vllm.kernels.decode.cpu_decode import row_starts, run_attention
from tq_vllm.kernels.window.exact import ExactIndex
from tq_vllm.record.codec import LayerCodec


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    codec: LayerCodec,
    scale: float,
    window: int,
    sparse_v: float,
) -> torch.Tensor:
    """A decode step (one row per sequence, block_table's first rows theirs) under the
    exact-window rule: windowed._merged's result ([B, Hq, d] in query's dtype) from the fused
    attention over each row's compressed positions and exact_merge, called directly. In a
    served model the Python between the ops cost more than the ops (at 256 tokens of context,
    over half of the forward's ~200 us per layer and step went to the general path's wrappers,
    argument checks and row picking); the ops check their arguments themselves."""
    rows = query.shape[0]
    lse = torch.empty(rows, query.shape[1], dtype=torch.float32)
    compressed = run_attention(
        query, kv_cache, block_table[:rows], row_starts(rows), index.segment_starts, codec,
        scale, 1, 0, sparse_v, lse_out=lse, out_dtype=torch.float32,
    )  # fmt: skip
    return ops().exact_merge(
        query, key, value, ring, None, index.segment_starts, index.visible, index.row_ring,
        index.ring_reads, window, scale, compressed, lse,
    )  # fmt: skip


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
