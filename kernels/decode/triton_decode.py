"""Split-K flash-decoding over the compressed paged cache (Triton).

Same contract as reference.decode_attention_reference. Work happens in the rotated domain
(tq_vllm/record/codec.py): the query is rotated once in PyTorch, a split kernel scores packed
keys straight from the records (n <q', c[idx]>, plus the QJL term in prod mode) and accumulates
sum_i p_i n_i c[idx_i] for the values, a reduce kernel merges the splits, and the output is
rotated back once. Dequantized keys and values only ever exist in registers.

The two dots per tile take fp16 operands with fp32 accumulation (tensor cores): centroids, +-1
signs and the scaled query are well inside fp16's range, and p * value norm is at most the value
norm (saturated to fp16 by the store anyway).

Speed: the records are ~5x smaller than bf16 K/V, so the kernel is bound by the instructions
spent per index, not by HBM. Hence packed groups unpacked in registers (_group_words), two
centroids per gather (centroid_table), the block size as a constexpr, and the per-codec state
built once on the host (per_codec).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tq_vllm.kernels.common import (
    CODEBOOKS,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    LN2,
    check_cache,
    check_gqa,
    check_lse_out,
    check_tensor,
)
from tq_vllm.kernels.triton_tiles import (
    launch_state,
    load_rows,
    rotated_queries,
    score_tile,
    sparse_v_constexprs,
    tile_records,
    value_tile,
    values_needed,
    word_aligned,
)
from tq_vllm.kernels.triton_unpack import codebook_for
from tq_vllm.record.codec import LayerCodec


@triton.jit
def _decode_split_kernel(
    q_ptr,
    qs_ptr,
    cache_ptr,
    table_ptr,
    seq_lens_ptr,
    kcent_ptr,
    vcent_ptr,
    kocent_ptr,
    o_ptr,
    lse_ptr,
    num_q_heads,
    num_splits,
    table_stride,
    cache_sb,
    cache_sh,
    cache_ss,
    window,
    BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEY_BITS: tl.constexpr,
    PROD: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    KEY_NORM_OFF: tl.constexpr,
    KEY_RNORM_OFF: tl.constexpr,
    VALUE_NORM_OFF: tl.constexpr,
    KEY_IDX_OFF: tl.constexpr,
    KEY_SIGN_OFF: tl.constexpr,
    VALUE_IDX_OFF: tl.constexpr,
    KEY_N: tl.constexpr,
    KEY_OUTLIERS: tl.constexpr,
    KEY_OUTLIER_BITS: tl.constexpr,
    KEY_ONORM_OFF: tl.constexpr,
    KEY_OIDX_OFF: tl.constexpr,
    KEY_TILE: tl.constexpr,
    QS_TILE: tl.constexpr,
    QJL_COEF: tl.constexpr,
    SPARSE_V: tl.constexpr,
    SPARSE_V_LOG2: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    REGISTER_CODEBOOK: tl.constexpr,
    WORDS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    # A sliding window's first token: nothing before it is read (vLLM may have freed it).
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    first_tile = lo // BLOCK_N
    per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    first = first_tile + split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    # All G query heads of the KV head share the program, so each block is read once; the
    # rows are padded to GP >= 16, the smallest tl.dot.
    g = tl.arange(0, GP)
    rows = b * num_q_heads + h * G + g
    d = tl.arange(0, D)
    q = load_rows(q_ptr, rows, g < G, KEY_TILE)
    qs = q
    if PROD or KEY_OUTLIERS > 0:
        qs = load_rows(qs_ptr, rows, g < G, QS_TILE)
    table_row = table_ptr + b.to(tl.int64) * table_stride
    kcent = codebook_for(kcent_ptr, REGISTER_CODEBOOK, KEY_BITS)
    vcent = codebook_for(vcent_ptr, REGISTER_CODEBOOK, VALUE_BITS)
    kocent = codebook_for(kocent_ptr, REGISTER_CODEBOOK, KEY_OUTLIER_BITS)

    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for tile in range(first, last):
        t = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = t < seq_len
        if HAS_WINDOW:
            tmask = tmask & (t >= lo)
        rec = tile_records(
            cache_ptr, table_row, h, t, tmask, BLOCK_SIZE, cache_sb, cache_sh, cache_ss
        )
        s = score_tile(
            q, qs, rec, tmask, kcent, kocent, KEY_NORM_OFF, KEY_RNORM_OFF, KEY_IDX_OFF,
            KEY_SIGN_OFF, KEY_ONORM_OFF, KEY_OIDX_OFF, D, KEY_BITS, PROD, QJL_COEF, KEY_N,
            KEY_OUTLIERS, KEY_OUTLIER_BITS, REGISTER_CODEBOOK=REGISTER_CODEBOOK,
            WORDS=WORDS,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        read = True
        if SPARSE_V:
            read = values_needed(s, m_new, g < G, SPARSE_V_LOG2)
        if read:
            acc += value_tile(
                p, rec, tmask, vcent, VALUE_NORM_OFF, VALUE_IDX_OFF, D, VALUE_BITS,
                REGISTER_CODEBOOK=REGISTER_CODEBOOK, WORDS=WORDS,
            )  # fmt: skip
        m = m_new

    # An empty split (short sequence) reports lse = -inf, which the reduction weighs 0.
    nonempty = lsum > 0
    out = acc / tl.where(nonempty, lsum, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, lsum, 1.0)), float("-inf"))
    part = rows.to(tl.int64) * num_splits + split
    tl.store(o_ptr + part[:, None] * D + d[None, :], out, mask=(g < G)[:, None])
    tl.store(lse_ptr + part, lse, mask=g < G)


@triton.jit
def _decode_reduce_kernel(
    o_ptr,
    lse_ptr,
    out_ptr,
    lse_out_ptr,
    num_splits,
    D: tl.constexpr,
    SP: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    smask = s < num_splits
    lse = tl.load(lse_ptr + row * num_splits + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty sequence: all weights 0
    w = tl.exp2(lse - top)
    d = tl.arange(0, D)
    # Masked lanes must read 0, not whatever is there: their weight is 0, and 0 * NaN is NaN.
    o_rows = o_ptr + (row * num_splits + s)[:, None] * D + d[None, :]
    o = tl.load(o_rows, mask=smask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out)
    if WRITE_LSE:  # base 2 here; the caller scales it to the natural log
        lse_row = tl.where(total > 0, top + tl.log2(tl.where(total > 0, total, 1.0)), -float("inf"))
        tl.store(lse_out_ptr + row, lse_row)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """About four programs per SM (each tile waits on a chain of dependent loads: block
    table, packed bytes, centroid table, so several resident programs hide each other's
    latency), without splits shorter than 256 tokens. From host numbers only (no seq_lens
    read), so it costs no device sync."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(4 * sms, batch * num_kv_heads), triton.cdiv(max_len, 256)))


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
    lse_out: torch.Tensor | None = None,
    codebook: str = "memory",
) -> torch.Tensor:
    """Triton decode_attention_reference: query [B, Hq, d] -> [B, Hq, d] in query's dtype.

    max_seq_len: the batch's longest sequence (vLLM's metadata has it on the host), which sizes
    the splits; None takes the block table's width, an upper bound (no device sync either way).
    num_splits: programs per (sequence, KV head) along the context (None: from the lengths);
    block_n: tokens per tile (a power of two >= 16; tiles may span paged blocks).
    num_stages: software pipelining depth; Triton's default of 3 needs 160 KB of shared
    memory at head_dim 256 (too much beside a second program per SM), 2 needs 98 KB.
    sparse_v: skip a tile's values where every weight lies below sparse_v times its row's
    running maximum (0: read every value).
    sliding_window: as in the reference; tokens before the window are never read.
    lse_out: float32 [B, Hq], written with each row's natural-log log-sum-exp of its scaled
    scores (-inf for a row that read nothing), to merge with an attention over other tokens.
    codebook: "memory" gathers centroids from a table in memory (L1); "registers" holds
    codebooks of up to 16 entries in registers and looks them up by byte permutes
    (register_codebook.py), reading 4-bit groups as whole words where records are 4-byte
    aligned. The same results either way (common.CODEBOOKS).
    """
    check_cache(kv_cache, codec)
    if codebook not in CODEBOOKS:
        raise ValueError(f"codebook must be one of {CODEBOOKS}, got {codebook!r}")
    device = kv_cache.device
    check_tensor("query", query, 3, FLOAT_DTYPES, device)
    check_lse_out(lse_out, query)
    check_tensor("block_table", block_table, 2, INDEX_DTYPES, device)
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, device)
    group = check_gqa(query, kv_cache, codec)
    batch, num_q_heads, head_dim = query.shape
    if block_table.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows and seq_lens {seq_lens.shape[0]} "
            f"entries for a batch of {batch} queries"
        )
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if num_splits is None:
        longest = block_table.shape[1] * block_size if max_seq_len is None else max_seq_len
        num_splits = default_num_splits(batch, num_kv_heads, longest, device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if batch == 0:
        return torch.empty_like(query)

    registers = codebook == "registers"
    constexprs, tables = launch_state(codec, registers)
    _, q, qs = rotated_queries(query, codec, scale)
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    partial = torch.empty(batch, num_q_heads, num_splits, head_dim, device=device)
    lse = torch.empty(batch, num_q_heads, num_splits, device=device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, qs, kv_cache, block_table, seq_lens, *tables,
        partial, lse, num_q_heads, num_splits, block_table.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), sliding_window or 0,
        HAS_WINDOW=sliding_window is not None, BLOCK_SIZE=block_size,
        REGISTER_CODEBOOK=registers, WORDS=registers and word_aligned(kv_cache),
        G=group, GP=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages, **constexprs, **sparse_v_constexprs(sparse_v),
    )  # fmt: skip
    if num_splits == 1:  # one split per row holds the whole softmax: nothing to merge
        out = partial.view(batch, num_q_heads, head_dim)
        if lse_out is not None:
            torch.mul(lse.view(batch, num_q_heads), LN2, out=lse_out)
    else:
        out = torch.empty(batch, num_q_heads, head_dim, device=device)
        _decode_reduce_kernel[(batch * num_q_heads,)](
            partial, lse, out, lse if lse_out is None else lse_out, num_splits, D=head_dim,
            SP=triton.next_power_of_2(num_splits), WRITE_LSE=lse_out is not None,
        )  # fmt: skip
        if lse_out is not None:
            lse_out.mul_(LN2)
    return (out @ codec.rotation).to(query.dtype)
