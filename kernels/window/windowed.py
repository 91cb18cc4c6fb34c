"""The exact-window rule on any device: the compressed kernels (C++ on the CPU, Triton on CUDA
or in the interpreter, else the PyTorch reference) attend each row over its compressed
positions (< s(p)) as a decode row of that length and return their log-sum-exp, exact.py
attends the exact ones, and the two merge. On the CPU a prefill chunk (a sequence with
cpu_context's DENSE_ROWS rows or more) runs as the dense path runs chunks without the window:
in one call of vLLM's kernel (dense_window.py). Same contract as
reference.exact_window_attention_reference."""

from __future__ import annotations

import torch

from tq_vllm.kernels import dispatch
from tq_vllm.kernels.context.cpu_context import dense_sequences
from tq_vllm.kernels.window.dense_window import windowed_prefill
from tq_vllm.kernels.window.exact import ExactIndex, exact_attention, exact_timeline, merge
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
    timeline = exact_timeline(key, value, ring, index, window)
    out = torch.empty_like(query)
    rest = torch.ones(query.shape[0], dtype=torch.bool, device=query.device)
    if dispatch.cpu_kernel(kv_cache, codec):
        for b in dense_sequences(query, codec, torch.bincount(index.row_seq).tolist()):
            rows = (index.row_seq == b).nonzero().flatten()  # a sequence's rows are consecutive
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            begin, first = int(index.window_start[lo]), int(index.segment_starts[lo])
            first += int(index.visible[lo]) - 1  # the chunk's first position
            exact = timeline[begin : begin + first + hi - lo - int(index.segment_starts[lo])]
            chunk = windowed_prefill(
                query[lo:hi], exact, kv_cache, block_table[b], first, codec, scale, window
            )
            if chunk is not None:
                out[lo:hi], rest[lo:hi] = chunk, False
    if not rest.any():
        return out
    rows = rest.nonzero().flatten()
    all_rows = len(rows) == query.shape[0]
    pick = (lambda t: t) if all_rows else (lambda t: t[rows])
    n, hq = len(rows), query.shape[1]
    lse = torch.empty(n, hq, device=query.device)
    # On the CPU a bf16 query takes the C++ op's bf16 dots; Triton gets float32 rows.
    q = pick(query) if query.device.type == "cpu" else pick(query).float()
    compressed = dispatch.decode_attention(
        q, kv_cache, block_table[pick(index.row_seq)], pick(index.segment_starts), codec, scale,
        index.longest_segment_start, sparse_v, lse_out=lse,
    )  # fmt: skip
    exact, exact_lse = exact_attention(
        pick(query), timeline, pick(index.window_start), pick(index.visible), window, scale
    )
    merged = merge(compressed, lse, exact, exact_lse).to(query.dtype)
    if all_rows:
        return merged
    out[rows] = merged
    return out
