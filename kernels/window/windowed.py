"""The exact-window rule on any device: the compressed kernels (C++ on the CPU, Triton on CUDA
or in the interpreter, else the PyTorch reference) attend each row over its compressed
positions (< s(p)) as a decode row of that length and return their log-sum-exp, exact.py
attends the exact ones, and the two merge. Same contract as
reference.exact_window_attention_reference."""

from __future__ import annotations

import torch

from tq_vllm.kernels import dispatch
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
    not written), index on query's device. Returns [T, Hq, d] in query's dtype."""
    n, hq = query.shape[:2]
    lse = torch.empty(n, hq, device=query.device)
    compressed = dispatch.decode_attention(
        query.float(), kv_cache, block_table[index.row_seq], index.segment_starts, codec, scale,
        index.longest_segment_start, sparse_v, lse_out=lse,
    )  # fmt: skip
    exact, exact_lse = exact_attention(query, key, value, ring, index, window, scale)
    return merge(compressed, lse, exact, exact_lse).to(query.dtype)
