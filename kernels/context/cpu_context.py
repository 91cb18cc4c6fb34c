"""Prefill chunks on the CPU: the contract of reference.context_attention_reference with key =
value = None (the chunk's tokens already in kv_cache, the serving path).

A sequence with at least DENSE_ROWS new rows of a query in DENSE_DTYPES takes the dense path
(dense.py: its cached tokens dequantized once, then a dense attention kernel); the others run
the fused C++ attention (decode/cpu_decode.py) with CONTEXT_ROWS query rows per work item.
"""

from __future__ import annotations

import itertools

import torch

from tq_vllm.kernels.common import INDEX_DTYPES, check_tensor
from tq_vllm.kernels.context.dense import dense_attention
from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.decode.cpu_decode import check_attention_inputs, run_attention
from tq_vllm.record.codec import LayerCodec

# Query rows x GQA group of one context work item: each decoded token serves this many rows,
# and the item's accumulators (rows x head_dim floats) stay in L1/L2.
CONTEXT_ROWS = 64
# Sequences with at least this many new rows take the dense path: their cached tokens
# dequantized once into the query's dtype, then a dense attention kernel (vLLM's, else SDPA),
# which outruns the fused one per score.
DENSE_ROWS = 16
DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def context_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    num_splits: int = 0,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """context_attention_reference with key = value = None (the chunk's tokens already in
    kv_cache): query [T, Hq, d] -> [T, Hq, d] in query's dtype, causal. A sequence with at
    least DENSE_ROWS new rows takes the dense path (its keys and values rounded to the
    query's dtype; every value read, whatever sparse_v); the others run fused, in float32,
    with sparse V as in cpu_decode.decode_attention. sliding_window: as in the reference;
    tokens before a row's window are never read."""
    check_attention_inputs(query, kv_cache, block_table, seq_lens, codec, uniform_ok=True)
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES)
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries for "
            f"{seq_lens.shape[0]} sequences (needs one more)"
        )
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    q_lens = [hi - lo for lo, hi in zip(starts, starts[1:])]
    dense = dense_sequences(query, codec, q_lens)
    fused = [b for b, n in enumerate(q_lens) if n and b not in dense]
    rows = max(1, CONTEXT_ROWS // (query.shape[1] // kv_cache.shape[1]))

    def fused_attention(q, table, q_starts, q_lens):
        if codec.layout.uniform_values:  # no fused kernel reads uniform values
            return context_attention_reference(
                q, None, None, kv_cache, table, q_starts, q_lens, codec, scale, sliding_window
            )
        return run_attention(
            q, kv_cache, table, q_starts, q_lens, codec, scale, rows, num_splits, sparse_v,
            sliding_window,
        )  # fmt: skip

    if not dense:
        return fused_attention(query, block_table, query_start_loc, seq_lens)
    out = torch.empty_like(query)
    picked = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in dense])
    out[picked] = dense_attention(
        query[picked],
        kv_cache,
        block_table,
        dense,
        [q_lens[b] for b in dense],
        [lens[b] for b in dense],
        codec,
        scale,
        sliding_window,
    )
    if fused:  # the sequences with few new rows, together in one fused call
        picked = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in fused])
        sub_starts = torch.tensor([0, *itertools.accumulate(q_lens[b] for b in fused)])
        out[picked] = fused_attention(
            query[picked], block_table[fused], sub_starts, seq_lens[fused]
        )
    return out


def dense_sequences(query: torch.Tensor, codec: LayerCodec, q_lens: list[int]) -> list[int]:
    """The sequences that take the dense path: those with at least DENSE_ROWS new rows, where
    the query's dtype and the layout allow it."""
    return [b for b, n in enumerate(q_lens) if n >= DENSE_ROWS and _dense_ok(query, codec)]


def _dense_ok(query: torch.Tensor, codec: LayerCodec) -> bool:
    # The dense path rounds keys and values to the query's dtype, the precision the model's
    # own attention runs at (float32: no rounding; 7-8x faster than fused on the AVX2 build,
    # 2-3x on AVX-512, 2K-token chunks). Prod keys need their QJL term: fused only. Uniform
    # values (an eval baseline with no fused kernel) take it too.
    return query.dtype in DENSE_DTYPES and not codec.layout.prod
