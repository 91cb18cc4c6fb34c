"""Decode through the fused C++ attention op (attention.cpp): the contract of
reference.decode_attention_reference, and the runner the context path's short chunks share.

The kernel works in the rotated domain like the Triton kernels: queries are rotated (and
scaled), the C++ code scores packed keys straight from the records and sums centroid values
under an online softmax, and the output is rotated back. The op rotates every output back, and
the queries too for plain mse keys; split and prod keys' queries arrive rotated (run_attention).
bf16 queries on builds with AVX512-BF16 take bf16 dots (kernels/decode/bf16_dots.h: the
query, centroids and weights rounded to bf16, sums in float32, 1.15-1.4x faster per token)
unless TQ_VLLM_BF16_DOTS=0, where the layout fits them (Bf16Dots::fits: plain Lloyd-Max keys
and values of up to 6 bits, head dims 64/128/256); other queries and layouts, and every query
with the switch at 0, float32 ones. On the eval's 51,175 tokens with every row through the op
(chunks of 8, the default config) they cost +0.064% perplexity (standard error 0.041%) over
the float32 dots.
Threads: ATen's intra-op pool (torch.get_num_threads(), which vLLM sets).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from tq_vllm.kernels.common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_gqa,
    check_lse_out,
    check_records,
    check_tensor,
)
from tq_vllm.kernels.cpu_extension import codebooks, ops
from tq_vllm.record.codec import LayerCodec

BF16_DOTS_ENV = "TQ_VLLM_BF16_DOTS"
BF16_DOTS_CHOICES = ("0", "1")  # startup refuses others
BF16_DOTS = os.environ.get(BF16_DOTS_ENV) != "0"


def check_attention_inputs(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    uniform_ok: bool = False,
) -> None:
    check_tensor("query", query, 3, FLOAT_DTYPES)
    check_records(kv_cache, codec, uniform_ok=uniform_ok)
    check_tensor("block_table", block_table, 2, INDEX_DTYPES)
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES)
    check_gqa(query, kv_cache, codec)
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows for {seq_lens.shape[0]} sequences"
        )


def run_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    rows_per_tile: int,
    num_splits: int,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
    lse_out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    rotated = rotated_queries(query, codec, scale)
    q, qs = rotated or (query.float().contiguous(),) * 2
    books = codebooks(codec)
    out = ops().attention(
        q,
        qs,
        kv_cache,
        block_table.to(torch.int32),
        query_start_loc.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        books.key,
        books.value,
        books.layout,
        qjl_coefficient(codec),
        rows_per_tile,
        num_splits,
        books.outlier,
        sparse_v,
        sliding_window or 0,
        lse_out,
        bf16_dots(query),
        codec.rotation,
        books.rotation_t,
        rotated is None,
        scale,
    )
    return out.to(out_dtype or query.dtype)


def rotated_queries(
    query: torch.Tensor, codec: LayerCodec, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(R q scale, qs) for the layouts whose queries the op cannot rotate itself: split keys
    have a rotation per head and prod keys need qs = S R q scale as well. None for plain mse
    keys, which the op rotates and scales. Every output is rotated back in the op."""
    layout = codec.layout
    if not layout.prod and not layout.split_keys:
        return None
    q = (codec.rotate_queries(query) * scale).contiguous()
    return q, (q @ codec.key.qjl.T).contiguous() if layout.prod else q


def qjl_coefficient(codec: LayerCodec) -> float:
    """The prod keys' QJL term's factor, sqrt(pi / 2) / d."""
    return math.sqrt(math.pi / 2) / codec.head_dim


def bf16_dots(query: torch.Tensor) -> bool:
    """Whether the op takes bf16 dots for these queries (where the build has them, bf16_dots.h)."""
    return BF16_DOTS and query.dtype == torch.bfloat16


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    num_splits: int = 0,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
    lse_out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """decode_attention_reference, fused: query [B, Hq, d] -> [B, Hq, d] in out_dtype (None:
    query's).

    num_splits: context splits per (sequence, KV head), merged by log-sum-exp; 0 picks enough
    to give every thread about 4 work items, with splits of at least 256 tokens.
    sparse_v: skip a 64-token tile's values where every weight lies below sparse_v times the
    row's running maximum (0: read every value, the reference's result).
    sliding_window: as in the reference; tokens before the window are never read.
    lse_out: float32 [B, Hq], written with each row's log-sum-exp of its scaled scores (-inf
    for a row that read nothing), to merge this attention with one over other tokens; such a
    partial is best asked for in float32 (out_dtype), so that it is not rounded twice."""
    check_attention_inputs(query, kv_cache, block_table, seq_lens, codec)
    check_lse_out(lse_out, query)
    if query.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"{query.shape[0]} queries for {seq_lens.shape[0]} sequences")
    return run_attention(
        query, kv_cache, block_table, row_starts(query.shape[0]), seq_lens, codec, scale, 1,
        num_splits, sparse_v, sliding_window, lse_out, out_dtype,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)  # a decode batch's query_start_loc, asked per layer and step
def row_starts(rows: int) -> torch.Tensor:
    """query_start_loc of `rows` sequences with one query row each."""
    return torch.arange(rows + 1, dtype=torch.int32)
