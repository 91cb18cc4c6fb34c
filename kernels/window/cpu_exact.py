"""The exact window on the CPU (window/exact.cpp): its exact part and merge in one op per layer
and step, reading the ring and the step's own keys and values where they lie (instead of
exact.exact_merge_reference's gathers and dozen PyTorch calls), and the ring's write.
decode_step: a whole decode step in one op (window/decode_step.cpp)."""

from __future__ import annotations

import torch

from tq_vllm.kernels.common import per_codec
from tq_vllm.kernels.cpu_extension import codebooks, ops
from tq_vllm.kernels.decode.cpu_decode import bf16_dots, qjl_coefficient, rotated_queries
from tq_vllm.kernels.store.cpu_store import store_arguments
from tq_vllm.kernels.window.exact import ExactIndex
from tq_vllm.record.codec import LayerCodec


def decode_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    codec: LayerCodec,
    scale: float,
    window: int,
    sparse_v: float,
) -> None:
    """A decode step (one row per sequence, block_table's first rows theirs, one slot per row)
    under the exact-window rule, whole: what store_kv, windowed_attention and write_ring do in
    turn, in one op. query [B, Hq, d], key and value [B, Hk, d]; out [B, Hq, d] (contiguous,
    query's dtype) gets the attention. In a served model the Python and dispatch around four ops
    cost more than their work (each layer's weights pass through the caches between two of its
    steps, so every call runs cold); the op checks its arguments itself."""
    rotated = rotated_queries(query, codec, scale)
    ops().decode_step(
        query, key, value, out, kv_cache, slot_mapping, block_table, ring, index.segment_starts,
        index.visible, index.row_ring, index.ring_reads, index.write_tokens, index.write_blocks,
        index.write_slots, window, scale, sparse_v, bf16_dots(query),
        *(rotated or (None, None)), *per_codec(codec, "cpu decode step", _codec_arguments),
    )  # fmt: skip


def _codec_arguments(codec: LayerCodec) -> tuple:
    """decode_step.cpp's arguments from the codec: the attention's codebooks, rotation and
    QJL factor, then the store's."""
    books = codebooks(codec)
    return (books.key, books.value, books.outlier, codec.rotation, books.rotation_t,
            qjl_coefficient(codec), *store_arguments(codec))  # fmt: skip


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
