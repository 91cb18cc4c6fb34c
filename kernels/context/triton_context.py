"""Attention of prefill chunks (q_len >= 1) over compressed context + fresh tokens (Triton).

Same contract as reference.context_attention_reference. Fused, not dequantize-then-
attend: one program takes a tile of query positions x all G query heads of one KV head, runs
the decode kernel's tile code (triton_tiles.py: scores and values straight from the packed
records) over the sequence's earlier, compressed tokens, then flash-attends causally over the
chunk's own fresh keys and values in full precision, all under one online softmax. Everything
is in the rotated domain: queries and fresh keys/values are rotated in PyTorch first, the
output rotated back once. No workspace, no host sync (given max_query_len). With key and
value None, the chunk's own tokens are read back from the cache like the context (causal),
or, with an exact window, only the positions before each row's exact ones (ExactRule), and the
rows' log-sum-exps come back for kernels/window/exact.py to merge with the exact part.

Precision: compressed tokens are scored with fp16 tensor-core dots as in triton_decode.py. Fresh
tokens take fp16 dots for fp16/bf16 queries (their rounding is below the inputs' own) and
float32-accurate dots for float32 queries, which would otherwise lose ~1e-3 on peaked
softmaxes. Those are 3xTF32 on tensor cores: exact FMA dots ("ieee") spilled kilobytes of
registers per thread and made this kernel the slowest to compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tq_vllm.kernels.common import (
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
)
from tq_vllm.kernels.window.exact import ExactRule
from tq_vllm.record.codec import LayerCodec


@triton.jit
def _reference_max(m_new, HAS_WINDOW: tl.constexpr):
    """The maximum the tile's weights are taken against. A row whose window starts past the
    tile has seen nothing yet (-inf): 0 instead keeps its weights 0, not -inf - -inf = NaN."""
    if HAS_WINDOW:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new


@triton.jit
def _exact_start(p, W: tl.constexpr, G: tl.constexpr, A: tl.constexpr):
    """ExactRule.start in the kernel."""
    return tl.maximum(p // G * G - (W - G), p // A * A)


def _exact_constexprs(rule: ExactRule | None) -> dict[str, int]:
    if rule is None:
        return dict(EXACT_WINDOW=0, EXACT_GRAIN=1, EXACT_ANCHOR=1)
    return dict(EXACT_WINDOW=rule.window, EXACT_GRAIN=rule.grain, EXACT_ANCHOR=rule.anchor)


@triton.jit
def _context_kernel(
    qf_ptr,
    q_ptr,
    qs_ptr,
    k_ptr,
    v_ptr,
    cache_ptr,
    table_ptr,
    qsl_ptr,
    seq_lens_ptr,
    kcent_ptr,
    vcent_ptr,
    kocent_ptr,
    o_ptr,
    lse_ptr,
    num_q_heads,
    num_kv_heads,
    table_stride,
    cache_sb,
    cache_sh,
    cache_ss,
    window,
    BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
    FRESH_FP32: tl.constexpr,
    ALL_CACHED: tl.constexpr,
    EXACT_WINDOW: tl.constexpr,
    EXACT_GRAIN: tl.constexpr,
    EXACT_ANCHOR: tl.constexpr,
    SPARSE_V: tl.constexpr,
    SPARSE_V_LOG2: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    tile_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    start = tl.load(qsl_ptr + b).to(tl.int32)
    q_len = tl.load(qsl_ptr + b + 1).to(tl.int32) - start
    context = tl.load(seq_lens_ptr + b).to(tl.int32) - q_len
    first = tile_m * BLOCK_M
    # Programs past this sequence's chunk run both loops zero times and store nothing.
    busy = first < q_len
    context = tl.where(busy, context, 0)
    fresh_end = tl.where(busy, tl.minimum(q_len, first + BLOCK_M), 0)

    # Row r of the tile is query position first + r // GP, head h * G + r % GP.
    r = tl.arange(0, BLOCK_M * GP)
    pos = first + r // GP
    g = r % GP
    rmask = (pos < q_len) & (g < G)
    rows = (start + pos).to(tl.int64) * num_q_heads + h * G + g
    d = tl.arange(0, D)
    q = load_rows(q_ptr, rows, rmask, KEY_TILE)
    qs = q
    if PROD or KEY_OUTLIERS > 0:
        qs = load_rows(qs_ptr, rows, rmask, QS_TILE)
    table_row = table_ptr + b.to(tl.int64) * table_stride

    m = tl.full([BLOCK_M * GP], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([BLOCK_M * GP], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * GP, D], dtype=tl.float32)
    # The context precedes every query: no mask. With ALL_CACHED the chunk's own tokens are
    # read back compressed too, causally; with EXACT_WINDOW only those before the row's exact
    # ones (ExactRule.start).
    cached_end = context + fresh_end if ALL_CACHED else context
    visible_end = context + pos + 1  # per row: positions < visible_end
    if EXACT_WINDOW > 0:
        visible_end = _exact_start(context + pos, EXACT_WINDOW, EXACT_GRAIN, EXACT_ANCHOR)
        cached_end = _exact_start(context + fresh_end - 1, EXACT_WINDOW, EXACT_GRAIN, EXACT_ANCHOR)
    # >= 64 rows take wgmma, whose tile operands Triton 3.6 cannot take straight from the
    # interleave (score_tile's NORM_ON_TILE).
    norm_on_tile: tl.constexpr = BLOCK_M * GP >= 64
    # With a sliding window, row pos sees context + pos - window < t; nothing before the first
    # row's window is read (vLLM may have freed it).
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(context + first - window + 1, 0)
    for n0 in range(lo // BLOCK_N * BLOCK_N, cached_end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        tmask = t < cached_end
        if HAS_WINDOW:
            tmask = tmask & (t >= lo)
        rec = tile_records(
            cache_ptr, table_row, h, t, tmask, BLOCK_SIZE, cache_sb, cache_sh, cache_ss
        )
        s = score_tile(
            q, qs, rec, tmask, kcent_ptr, kocent_ptr, KEY_NORM_OFF, KEY_RNORM_OFF, KEY_IDX_OFF,
            KEY_SIGN_OFF, KEY_ONORM_OFF, KEY_OIDX_OFF, D, KEY_BITS, PROD, QJL_COEF, KEY_N,
            KEY_OUTLIERS, KEY_OUTLIER_BITS, norm_on_tile,
        )  # fmt: skip
        if ALL_CACHED:
            s = tl.where(t[None, :] < visible_end[:, None], s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(t[None, :] > (context + pos - window)[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = _reference_max(m_new, HAS_WINDOW or EXACT_WINDOW > 0)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        read = True
        if SPARSE_V:
            read = values_needed(s, m_new, rmask, SPARSE_V_LOG2)
        if read:
            acc += value_tile(
                p, rec, tmask, vcent_ptr, VALUE_NORM_OFF, VALUE_IDX_OFF, D, VALUE_BITS,
                norm_on_tile,
            )  # fmt: skip
        m = m_new
    # Fresh keys are rotated whole (M_h k for split keys): they meet the whole q'.
    qf = q
    if FRESH_FP32:
        qf = tl.load(qf_ptr + rows[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    elif KEY_OUTLIERS > 0:
        qf = load_rows(qf_ptr, rows, rmask, D)
    for n0 in range(0, 0 if ALL_CACHED else fresh_end, BLOCK_N):  # the chunk's tokens, causal
        j = n0 + tl.arange(0, BLOCK_N)
        jmask = j < fresh_end
        fresh = ((start + j).to(tl.int64) * num_kv_heads + h)[:, None] * D + d[None, :]
        k = tl.load(k_ptr + fresh, mask=jmask[:, None], other=0.0)
        if FRESH_FP32:
            s = tl.dot(qf, tl.trans(k), input_precision="tf32x3")
        else:
            s = tl.dot(qf, tl.trans(k.to(tl.float16)))
        s = tl.where(jmask[None, :] & (j[None, :] <= pos[:, None]), s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where(j[None, :] > (pos - window)[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = _reference_max(m_new, HAS_WINDOW)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + fresh, mask=jmask[:, None], other=0.0)
        if FRESH_FP32:
            pv = tl.dot(p, v, input_precision="tf32x3")
        else:
            pv = tl.dot(p.to(tl.float16), v.to(tl.float16))
        acc = acc * alpha[:, None] + pv
        m = m_new

    out = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * D + d[None, :], out, mask=rmask[:, None])
    if EXACT_WINDOW > 0:  # base 2, -inf where the row read nothing; the caller scales it
        lse = tl.where(lsum > 0, m + tl.log2(tl.where(lsum > 0, lsum, 1.0)), float("-inf"))
        tl.store(lse_ptr + rows, lse, mask=rmask)


def context_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    max_query_len: int | None = None,
    rows: int = 64,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int | None = None,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
    exact_rule: ExactRule | None = None,
    lse_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton context_attention_reference: query [T, Hq, d] -> [T, Hq, d] in query's dtype.

    key, value: the chunk's tokens [T, Hk, d] in full precision, or both None to read them
    back from kv_cache (stored before attention), as a later decode step would see them.
    max_query_len: the longest chunk (vLLM's metadata has it on the host); None reads it from
    query_start_loc, a device sync. rows: query rows per program (positions x heads of a GQA
    group, a power of two >= 16); block_n: keys per tile (a power of two >= 32).
    sparse_v: as in triton_decode.decode_attention, for the compressed tokens (the fresh ones
    are always read). sliding_window: as in the reference; compressed tokens before a row
    tile's window are never read. exact_rule (key and value None): a row at position p
    reads positions < exact_rule.start(p), and lse_out (float32 [T, Hq], required) gets each row's
    natural-log log-sum-exp, -inf where it read nothing (kernels/window/exact.py's contract).
    """
    check_cache(kv_cache, codec)
    device = kv_cache.device
    check_tensor("query", query, 3, FLOAT_DTYPES, device)
    all_cached = key is None and value is None
    if exact_rule and (not all_cached or lse_out is None):
        raise ValueError("exact_rule reads the chunk back from the cache and needs lse_out")
    check_lse_out(lse_out, query)
    if not all_cached:
        check_tensor("key", key, 3, FLOAT_DTYPES, device)
        check_tensor("value", value, 3, FLOAT_DTYPES, device)
    check_tensor("block_table", block_table, 2, INDEX_DTYPES, device)
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES, device)
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, device)
    group = check_gqa(query, kv_cache, codec)
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, block_size = kv_cache.shape[1], kv_cache.shape[2]
    expected = (num_tokens, num_kv_heads, head_dim)
    fresh = () if all_cached else (("key", key), ("value", value))
    for name, t in fresh:
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must be [T, Hk, d] = {list(expected)}, got {list(t.shape)}")
    batch = seq_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1 or block_table.shape[0] != batch:
        raise ValueError(
            f"query_start_loc needs {batch + 1} entries and block_table {batch} rows for "
            f"{batch} sequences, got {query_start_loc.shape[0]} and {block_table.shape[0]}"
        )
    # 16-key tiles under 64 rows computed wrong results on an H200 with Triton 3.6 (compiled
    # kernel tests, 2026-11-27; the interpreter is fine), so tiles start at 32 keys.
    for name, n, least in (("rows", rows, 16), ("block_n", block_n, 32)):
        if n < least or n & (n - 1):
            raise ValueError(f"{name} must be a power of two >= {least}, got {n}")
    if num_tokens == 0 or batch == 0:
        return torch.empty_like(query)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len < 1:
        return torch.empty_like(query)
    lse = torch.empty(0, device=device) if lse_out is None else lse_out

    if num_stages is None:
        # At head_dim 256 two pipeline stages asked for 256 KiB of shared memory, over the
        # H200's 227 KiB (compiled tests, 2026-11-27); one stage halves the staged tiles.
        num_stages = 2 if head_dim <= 128 else 1
    constexprs, tables = launch_state(codec)
    qf, q, qs = rotated_queries(query, codec, scale)
    k = q if all_cached else codec.rotate_queries(key).contiguous()  # q: a placeholder
    v = q if all_cached else codec.rotate(value).contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, rows // group_pad)
    out = torch.zeros(num_tokens, num_q_heads, head_dim, device=device)
    grid = (triton.cdiv(max_query_len, block_m), batch, num_kv_heads)
    _context_kernel[grid](
        qf, q, qs, k, v, kv_cache, block_table, query_start_loc, seq_lens,
        *tables, out, lse,
        num_q_heads, num_kv_heads, block_table.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), sliding_window or 0,
        HAS_WINDOW=sliding_window is not None, BLOCK_SIZE=block_size, G=group, GP=group_pad,
        BLOCK_M=block_m, D=head_dim, BLOCK_N=block_n,
        FRESH_FP32=query.dtype == torch.float32, ALL_CACHED=all_cached,
        **_exact_constexprs(exact_rule),
        num_warps=num_warps, num_stages=num_stages, **constexprs, **sparse_v_constexprs(sparse_v),
    )  # fmt: skip
    if lse_out is not None:
        lse_out.mul_(LN2)
    return (out @ codec.rotation).to(query.dtype)
