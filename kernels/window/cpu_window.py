"""The exact-window rule on the CPU: the fused C++ op attends each row over its compressed
positions (< s(p)) and returns their log-sum-exp, exact.py attends the exact ones, and the two
merge. Same contract as reference.exact_window_attention_reference."""

from __future__ import annotations

import torch

from tq_vllm.kernels.decode import cpu_decode
from tq_vllm.kernels.window.exact import ExactIndex, exact_attention, merge
from tq_vllm.record.codec import LayerCodec


def windowed_attention(
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
    sparse_v: float = 0.0,
) -> torch.Tensor:
    """query [T, Hq, d] and the step's key, value [T, Hk, d] (already stored as records),
    block_table [B, max_blocks] of the step's sequences, ring [num_rings, Hk, R, 2d] (read,
    not written). Returns [T, Hq, d] in query's dtype."""
    n, hq = query.shape[:2]
    lse = torch.empty(n, hq)
    compressed = cpu_decode.decode_attention(
        query.float(), kv_cache, block_table[index.row_seq], index.segment_starts, codec, scale,
        sparse_v=sparse_v, lse_out=lse,
    )  # fmt: skip
    exact, exact_lse = exact_attention(query, key, value, ring, index, window, scale)
    return merge(compressed, lse, exact, exact_lse).to(query.dtype)
