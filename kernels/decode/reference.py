"""Decode, the contract: one new query per sequence over its compressed paged cache
(PyTorch). Conventions as in context/reference.py."""

from __future__ import annotations

import torch

from tq_vllm.kernels.common import check_lse_out
from tq_vllm.record.codec import LayerCodec

# Decodes run together in groups of at most this many (padded) context tokens.
DECODE_GROUP_TOKENS = 1 << 16


def decode_attention_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    sliding_window: int | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence, query [B, Hq, d], over all seq_lens[b] cached tokens (the new
    token already stored), or with sliding_window W over the last W of them. Returns
    [B, Hq, d] in query's dtype.

    Sequences are decoded together, padded to the longest one in a group, with the padding
    masked out of both the softmax and the value sum (unused table entries may point at blocks
    holding anything, NaN included). A sequence of 0 tokens reads 0.
    lse_out: float32 [B, Hq], written with each row's log-sum-exp of its scaled scores (-inf
    for a sequence of 0 tokens)."""
    check_lse_out(lse_out, query)
    out = torch.empty_like(query)
    lens = seq_lens.tolist()
    block_size, hk = kv_cache.shape[2], kv_cache.shape[1]
    b, hq, d = query.shape
    start = 0
    while start < b:  # groups of at most DECODE_GROUP_TOKENS padded tokens bound the memory
        end, longest = start + 1, lens[start]
        while end < b and max(longest, lens[end]) * (end + 1 - start) <= DECODE_GROUP_TOKENS:
            longest = max(longest, lens[end])
            end += 1
        n = end - start
        num_blocks = (longest + block_size - 1) // block_size
        blocks = kv_cache[block_table[start:end, :num_blocks].long()]  # [n, nb, Hk, BS, C]
        records = blocks.transpose(1, 2).reshape(n, hk, num_blocks * block_size, kv_cache.shape[-1])
        k, v = codec.decode_rotated(records[:, :, :longest])  # [n, Hk, S, d]
        positions = torch.arange(longest, device=query.device)
        lens_n = seq_lens[start:end, None].to(query.device)
        valid = positions < lens_n  # [n, S]
        if sliding_window is not None:  # tokens before the window may sit in freed blocks
            valid &= positions >= lens_n - sliding_window
        v = v.masked_fill(~valid[:, None, :, None], 0.0)
        k = k.masked_fill(~valid[:, None, :, None], 0.0)
        q = codec.rotate_queries(query[start:end]).view(n, hk, hq // hk, d)
        scores = (q @ k.transpose(-1, -2)) * scale  # [n, Hk, G, S]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        if lse_out is not None:
            lse_out[start:end] = scores.logsumexp(-1).reshape(n, hq)
        o = torch.softmax(scores, dim=-1) @ v  # [n, Hk, G, d]
        # A sequence of no tokens (a padding row) attends to nothing: 0, not softmax's NaN.
        o[~valid.any(dim=1)] = 0.0
        out[start:end] = codec.unrotate(o.reshape(n, hq, d)).to(out.dtype)
        start = end
    return out
