"""The exact-window rule attended directly, row by row (the contract of exact.py with the
compressed kernels): a query at position p reads positions < s(p) = rule.start(p) from the
compressed records and s(p) .. p from the model-dtype keys and values, in one softmax. With
whole_chunks (window_prefill "chunk"), the rows of a sequence with at least that many rows in the
step read exactly from s(its first row) on."""

from __future__ import annotations

import torch

from tq_vllm.kernels.context.reference import gather_context
from tq_vllm.kernels.window.exact import ExactRule
from tq_vllm.record.codec import LayerCodec


def exact_window_attention_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
    whole_chunks: int = 0,
) -> torch.Tensor:
    """query [T, Hq, d], the rows of each sequence its newest tokens (chunked-prefill layout);
    keys[b], values[b] [>= seq_lens[b], Hk, d]: sequence b's exact keys and values by position;
    whole_chunks: 0, or the rows from which a sequence's rows share s(first row).
    Returns [T, Hq, d] float32."""
    out = torch.empty(query.shape, dtype=torch.float32)
    hq, d = query.shape[1:]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        k_hat, v_hat = gather_context(kv_cache, block_table[b], length, codec)  # [Hk, L, d]
        k_exact = codec.rotate_queries(keys[b][:length].float()).transpose(0, 1)
        v_exact = codec.rotate(values[b][:length].float()).transpose(0, 1)
        hk = k_hat.shape[0]
        for row in range(lo, hi):
            p = length - (hi - row)
            whole = 0 < whole_chunks <= hi - lo
            s = rule.start(length - (hi - lo) if whole else p)
            k = torch.cat([k_hat[:, :s], k_exact[:, s : p + 1]], 1)
            v = torch.cat([v_hat[:, :s], v_exact[:, s : p + 1]], 1)
            q = codec.rotate_queries(query[row].float()).view(hk, hq // hk, d) * scale
            weights = torch.einsum("hgd,hnd->hgn", q, k).softmax(-1)
            out[row] = codec.unrotate(torch.einsum("hgn,hnd->hgd", weights, v)).reshape(hq, d)
    return out
