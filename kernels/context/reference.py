"""PyTorch attention over the compressed paged cache: the reference for the Triton kernels
and the CPU serving path (same contracts).

Layout conventions (vLLM's): query head h reads KV head h // (Hq // Hk); block_table[b, i] is
the i-th block of sequence b; a sequence's token j sits at block_table[b, j // BS], offset
j % BS. Attention runs in the rotated domains (tq_vllm/record/codec.py) and is rotated back
once per output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tq_vllm.record.codec import LayerCodec


def gather_context(
    kv_cache: torch.Tensor, block_row: torch.Tensor, length: int, codec: LayerCodec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of one sequence: (R k_hat, R v_hat) [Hk, length, d]."""
    block_size = kv_cache.shape[2]
    num_blocks = (length + block_size - 1) // block_size
    blocks = kv_cache[block_row[:num_blocks].long()]  # [n, Hk, BS, C]
    records = blocks.transpose(0, 1).reshape(kv_cache.shape[1], -1, kv_cache.shape[3])
    return codec.decode_rotated(records[:, :length])


# Above this many scores per call, SDPA's blocked kernel beats materializing them.
DIRECT_SCORES = 1 << 22


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """q [Hq, L, d] over k, v [Hk, S, d], S = context + L, causal after the context; with a
    window W, the row at position p sees positions p - W < t <= p only."""
    hk, total = k.shape[0], k.shape[1]
    hq, length, d = q.shape
    mask = None
    if length > 1 or window is not None:
        rows = torch.arange(length, device=q.device).unsqueeze(1) + (total - length)
        cols = torch.arange(total, device=q.device)
        mask = cols <= rows
        if window is not None:
            mask &= cols > rows - window
            # What no row sees may come from freed blocks (anything, NaN included): zeroed,
            # as 0-weight products with NaN would still be NaN.
            unseen = cols <= (total - length) - window
            k, v = k.masked_fill(unseen[:, None], 0.0), v.masked_fill(unseen[:, None], 0.0)
    if hq * length * total > DIRECT_SCORES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    # A GQA group's query heads share one matmul with their KV head: no repeated K/V, and for
    # decode (length 1) far less overhead than SDPA.
    q, k, v = q.float().reshape(hk, (hq // hk) * length, d), k.float(), v.float()
    scores = (q @ k.transpose(1, 2)) * scale
    if mask is not None:
        scores = scores.view(hk, hq // hk, length, total).masked_fill(~mask, float("-inf"))
        scores = scores.view(hk, -1, total)
    return (torch.softmax(scores, dim=-1) @ v).view(hq, length, -1)


def context_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of query [T, Hq, d] for a batch of sequences with new tokens.

    Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] (q_len of them): its
    tokens at positions seq_lens[b] - q_len .. seq_lens[b] - 1. Earlier tokens (the context:
    chunked prefill, prefix-cache hits, decode history) are read from kv_cache; the new ones
    from key/value [T, Hk, d] in full precision, or, when key and value are None, from
    kv_cache too (they are stored before attention runs), so that every query sees exactly what
    a later decode step sees. Causal; with sliding_window W, the row at position p sees
    positions p - W < t <= p only. Returns [T, Hq, d] in query's dtype.
    """
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, total in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        context = total - (hi - lo)
        q = query[lo:hi].transpose(0, 1)  # [Hq, L, d]
        if key is None:
            k, v = gather_context(kv_cache, block_table[b], total, codec)
            o = _attend(
                codec.rotate_queries(query[lo:hi]).transpose(0, 1), k, v, scale, sliding_window
            )
            out[lo:hi] = codec.unrotate(o).transpose(0, 1).to(out.dtype)
            continue
        k, v = key[lo:hi].transpose(0, 1), value[lo:hi].transpose(0, 1)
        if context == 0:  # a fresh prefill: nothing compressed to read, no rotation needed
            out[lo:hi] = _attend(q, k, v, scale, sliding_window).transpose(0, 1).to(out.dtype)
            continue
        k_ctx, v_ctx = gather_context(kv_cache, block_table[b], context, codec)
        k = torch.cat([k_ctx, codec.rotate_queries(key[lo:hi]).transpose(0, 1)], dim=1)
        v = torch.cat([v_ctx, codec.rotate(v)], dim=1)
        o = _attend(codec.rotate_queries(query[lo:hi]).transpose(0, 1), k, v, scale, sliding_window)
        out[lo:hi] = codec.unrotate(o).transpose(0, 1).to(out.dtype)
    return out
