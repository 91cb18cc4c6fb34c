"""Split-K flash-decoding over the compressed paged cache (Triton).

Same contract as attention_reference.decode_attention_reference. Work happens in the rotated
domain (codec.py): the query is rotated once in PyTorch, a split kernel scores packed keys
straight from the records (n <q', c[idx]>, plus the QJL term in prod mode) and accumulates
sum_i p_i n_i c[idx_i] for the values, a reduce kernel merges the splits, and the output is
rotated back once. Dequantized keys and values only ever exist in registers.

The two dots per tile take fp16 operands with fp32 accumulation (tensor cores): centroids,
+-1 signs and the scaled query are well inside fp16's range, and p * value norm is at most
the value norm (saturated to fp16 by the store anyway).

Speed: the records are ~5x smaller than bf16 K/V, so the kernel is bound by the instructions
spent per index, not by HBM. Hence packed groups unpacked in registers (_group_words), two
centroids per gather (centroid_table), the block size as a constexpr, and the per-codec
state built once on the host (per_codec).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from tq_vllm.codec import LayerCodec
from tq_vllm.kernels.store import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_cache,
    check_tensor,
    load_fp16,
    per_codec,
)

LOG2E = 1.4426950408889634


@triton.jit
def tile_records(
    cache_ptr, table_row_ptr, h, t, tmask, BLOCK_SIZE: tl.constexpr, cache_sb, cache_sh, cache_ss
):  # fmt: skip
    """Record pointers [BLOCK_N] of a sequence's tokens t, through its block-table row. The
    block size is a constexpr (one per deployment): a division by a runtime value costs ~20
    instructions per token."""
    block = tl.load(table_row_ptr + t // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
    return cache_ptr + block * cache_sb + h.to(tl.int64) * cache_sh + (t % BLOCK_SIZE) * cache_ss


@triton.jit
def _group_words(rec, tmask, OFF: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """The packed field at rec + OFF (packing.py's layout) as words [BLOCK_N, D // 8] x 2.

    Eight BITS-bit indices fill exactly BITS bytes, least significant bit first: each group of
    eight is one little-endian word of 8 * BITS bits, returned as its low and high 32 bits.
    Byte k of every group is one [BLOCK_N, D // 8] load, so a lane holds whole groups and
    unpacking needs no data from other lanes. (One or two byte loads per index made the
    kernel instruction-bound, far below HBM speed.)
    """
    grp = rec[:, None] + OFF + (tl.arange(0, D // 8) * BITS)[None, :]
    lo = tl.zeros(grp.shape, dtype=tl.uint32)
    hi = tl.zeros(grp.shape, dtype=tl.uint32)
    for k in tl.static_range(BITS):
        byte = tl.load(grp + k, mask=tmask[:, None], other=0).to(tl.uint32)
        if k < 4:
            lo |= byte << (8 * k)
        else:
            hi |= byte << (8 * (k - 4))
    return lo, hi


@triton.jit
def _group_index(lo, hi, J: tl.constexpr, BITS: tl.constexpr):
    """Index J (0..7) of every group: bits J*BITS.. of the word lo | hi << 32 (int32)."""
    if J * BITS + BITS <= 32:
        v = lo >> (J * BITS)
    elif J * BITS >= 32:
        v = hi >> (J * BITS - 32)
    else:  # straddles the two halves
        v = (lo >> (J * BITS)) | (hi << (32 - J * BITS))
    return (v & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _interleave8(x0, x1, x2, x3, x4, x5, x6, x7, D: tl.constexpr):
    """[BLOCK_N, D // 8] x 8 -> [BLOCK_N, D] with x_j[:, g] at column 8g + j. join appends a
    last axis of 2 (kept in one lane's registers): this nesting leaves x_j, j = 4a + 2b + c,
    at [..., a, b, c], which the reshape flattens into column 8g + j."""
    x = tl.join(
        tl.join(tl.join(x0, x4), tl.join(x2, x6)), tl.join(tl.join(x1, x5), tl.join(x3, x7))
    )
    return tl.reshape(x, [x0.shape[0], D])


@triton.jit
def _centroid(lo, hi, cent_ptr, J: tl.constexpr, BITS: tl.constexpr):
    # Gathered on the [BLOCK_N, D // 8] tile, before the interleave: the gather then keeps
    # the tile's layout (no 64-bit pointers shuffled between lanes); the table has at most
    # 256 entries and stays in L1.
    return tl.load(cent_ptr + _group_index(lo, hi, J, BITS)).to(tl.float16)


@triton.jit
def _half(pair, H: tl.constexpr):
    """fp16 number H (0: low 16 bits) of the int32 pairs."""
    return ((pair >> (16 * H)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def load_centroids(rec, tmask, cent_ptr, OFF: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """c[idx] [BLOCK_N, D] (float16) for the BITS-bit indices packed at rec + OFF.

    cent_ptr is centroid_table(centroids, BITS): for BITS <= 4 it holds both centroids of
    every pair of adjacent indices (2 * BITS contiguous bits of the word), so one gather
    fetches two values; the gathers and their 64-bit addresses are most of the work per index.
    """
    lo, hi = _group_words(rec, tmask, OFF, D, BITS)
    if BITS <= 4:
        p0 = tl.load(cent_ptr + _group_index(lo, hi, 0, 2 * BITS))
        p1 = tl.load(cent_ptr + _group_index(lo, hi, 1, 2 * BITS))
        p2 = tl.load(cent_ptr + _group_index(lo, hi, 2, 2 * BITS))
        p3 = tl.load(cent_ptr + _group_index(lo, hi, 3, 2 * BITS))
        return _interleave8(
            _half(p0, 0), _half(p0, 1), _half(p1, 0), _half(p1, 1),
            _half(p2, 0), _half(p2, 1), _half(p3, 0), _half(p3, 1), D,
        )  # fmt: skip
    return _interleave8(
        _centroid(lo, hi, cent_ptr, 0, BITS), _centroid(lo, hi, cent_ptr, 1, BITS),
        _centroid(lo, hi, cent_ptr, 2, BITS), _centroid(lo, hi, cent_ptr, 3, BITS),
        _centroid(lo, hi, cent_ptr, 4, BITS), _centroid(lo, hi, cent_ptr, 5, BITS),
        _centroid(lo, hi, cent_ptr, 6, BITS), _centroid(lo, hi, cent_ptr, 7, BITS), D,
    )  # fmt: skip


@triton.jit
def _sign(lo, J: tl.constexpr):
    return (_group_index(lo, lo, J, 1) * 2 - 1).to(tl.float16)


@triton.jit
def load_signs(rec, tmask, OFF: tl.constexpr, D: tl.constexpr):
    """The QJL sign bits at rec + OFF as +-1 [BLOCK_N, D] (float16)."""
    lo, _ = _group_words(rec, tmask, OFF, D, 1)
    return _interleave8(
        _sign(lo, 0), _sign(lo, 1), _sign(lo, 2), _sign(lo, 3),
        _sign(lo, 4), _sign(lo, 5), _sign(lo, 6), _sign(lo, 7), D,
    )  # fmt: skip


@triton.jit
def score_tile(
    q,
    qs,
    rec,
    tmask,
    kcent_ptr,
    KEY_IDX_OFF: tl.constexpr,
    KEY_SIGN_OFF: tl.constexpr,
    D: tl.constexpr,
    KEY_BITS: tl.constexpr,
    PROD: tl.constexpr,
    QJL_COEF: tl.constexpr,
    NORM_ON_TILE: tl.constexpr = False,
):
    """Scores [M, BLOCK_N] of fp16 rotated queries q [M, D] (qs = S q', prod mode) against the
    compressed keys at rec [BLOCK_N]; -inf where tmask is false.

    NORM_ON_TILE scales the [BLOCK_N, D] tiles by the norms before the dots instead of the
    scores after them. Needed where M >= 64 (wgmma, B operand in shared memory): Triton 3.6
    folds a join/reshape tile straight into its shared-memory copy and builds an illegal rank-5
    NVMMA layout, so an op must sit between the reshape and the dot. Elsewhere it only costs
    instructions (the tile has more elements than the scores)."""
    norm = load_fp16(rec, tmask)
    if KEY_BITS > 0:
        kc = load_centroids(rec, tmask, kcent_ptr, KEY_IDX_OFF, D, KEY_BITS)
        if NORM_ON_TILE:
            s = tl.dot(q, tl.trans(kc * norm.to(tl.float16)[:, None]))
        else:
            s = tl.dot(q, tl.trans(kc)) * norm[None, :]
    else:
        s = tl.zeros([q.shape[0], rec.shape[0]], dtype=tl.float32)
    if PROD:
        rnorm = load_fp16(rec + 2, tmask)
        signs = load_signs(rec, tmask, KEY_SIGN_OFF, D)
        if NORM_ON_TILE:  # +-rnorm is exact in fp16
            s += tl.dot(qs, tl.trans(signs * rnorm.to(tl.float16)[:, None])) * QJL_COEF
        else:
            s += tl.dot(qs, tl.trans(signs)) * (rnorm * QJL_COEF)[None, :]
    return tl.where(tmask[None, :], s, float("-inf"))


@triton.jit
def value_tile(
    p,
    rec,
    tmask,
    vcent_ptr,
    VALUE_NORM_OFF: tl.constexpr,
    VALUE_IDX_OFF: tl.constexpr,
    D: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    NORM_ON_TILE: tl.constexpr = False,
):
    """sum_n p[:, n] * norm_n * c[idx_n]: [M, D] for weights p [M, BLOCK_N]. NORM_ON_TILE: as
    in score_tile."""
    norm = load_fp16(rec + VALUE_NORM_OFF, tmask)
    vc = load_centroids(rec, tmask, vcent_ptr, VALUE_IDX_OFF, D, VALUE_BITS)
    if NORM_ON_TILE:
        return tl.dot(p.to(tl.float16), vc * norm.to(tl.float16)[:, None])
    return tl.dot((p * norm[None, :]).to(tl.float16), vc)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    qs_ptr,
    cache_ptr,
    table_ptr,
    seq_lens_ptr,
    kcent_ptr,
    vcent_ptr,
    o_ptr,
    lse_ptr,
    num_q_heads,
    num_splits,
    table_stride,
    cache_sb,
    cache_sh,
    cache_ss,
    BLOCK_SIZE: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KEY_BITS: tl.constexpr,
    PROD: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    VALUE_NORM_OFF: tl.constexpr,
    KEY_IDX_OFF: tl.constexpr,
    KEY_SIGN_OFF: tl.constexpr,
    VALUE_IDX_OFF: tl.constexpr,
    QJL_COEF: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)

    # All G query heads of the KV head share the program, so each block is read once; the
    # rows are padded to GP >= 16, the smallest tl.dot.
    g = tl.arange(0, GP)
    rows = b * num_q_heads + h * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = q.to(tl.float16)
    qs = q
    if PROD:
        qs = tl.load(qs_ptr + rows[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        qs = qs.to(tl.float16)
    table_row = table_ptr + b.to(tl.int64) * table_stride

    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for tile in range(first, last):
        t = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = t < seq_len
        rec = tile_records(
            cache_ptr, table_row, h, t, tmask, BLOCK_SIZE, cache_sb, cache_sh, cache_ss
        )
        s = score_tile(
            q, qs, rec, tmask, kcent_ptr, KEY_IDX_OFF, KEY_SIGN_OFF, D, KEY_BITS, PROD, QJL_COEF
        )
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + value_tile(
            p, rec, tmask, vcent_ptr, VALUE_NORM_OFF, VALUE_IDX_OFF, D, VALUE_BITS
        )
        m = m_new

    # An empty split (short sequence) reports lse = -inf, which the reduction weighs 0.
    nonempty = lsum > 0
    out = acc / tl.where(nonempty, lsum, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, lsum, 1.0)), float("-inf"))
    part = rows.to(tl.int64) * num_splits + split
    tl.store(o_ptr + part[:, None] * D + d[None, :], out, mask=(g < G)[:, None])
    tl.store(lse_ptr + part, lse, mask=g < G)


@triton.jit
def _decode_reduce_kernel(o_ptr, lse_ptr, out_ptr, num_splits, D: tl.constexpr, SP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, SP)
    smask = s < num_splits
    lse = tl.load(lse_ptr + row * num_splits + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)  # an empty sequence: all weights 0
    w = tl.exp2(lse - top)
    d = tl.arange(0, D)
    o = tl.load(o_ptr + (row * num_splits + s)[:, None] * D + d[None, :], mask=smask[:, None])
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out)


def centroid_table(centroids: torch.Tensor, bits: int) -> torch.Tensor:
    """What load_centroids gathers from: the float32 centroids for bits > 4; for bits <= 4
    int32 [2^(2 bits)] whose entry p holds fp16 c[p & (2^bits - 1)] in its low half and fp16
    c[p >> bits] in its high half."""
    if bits > 4:
        return centroids
    h = centroids.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    p = torch.arange(1 << (2 * bits), device=centroids.device)
    pairs = h[p & ((1 << bits) - 1)] | (h[p >> bits] << 16)
    return torch.where(pairs >= 1 << 31, pairs - (1 << 32), pairs).to(torch.int32)


def layout_constexprs(codec: LayerCodec) -> dict:
    layout = codec.layout
    return dict(
        KEY_BITS=layout.key_index_bits,
        PROD=layout.prod,
        VALUE_BITS=layout.value_bits,
        VALUE_NORM_OFF=layout.value_norm,
        KEY_IDX_OFF=layout.key_indices,
        KEY_SIGN_OFF=layout.key_signs,
        VALUE_IDX_OFF=layout.value_indices,
        QJL_COEF=math.sqrt(math.pi / 2) / codec.head_dim,
    )


def _launch_state(codec: LayerCodec) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    layout = codec.layout
    tables = (
        centroid_table(codec.key.centroids, layout.key_index_bits),
        centroid_table(codec.value.centroids, layout.value_bits),
    )
    return layout_constexprs(codec), tables


def launch_state(codec: LayerCodec) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
    """(layout_constexprs, (key table, value table)) of the attention kernels, built once."""
    return per_codec(codec, "attention", _launch_state)


def rotated_queries(
    query: torch.Tensor, codec: LayerCodec, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q' = R q with softmax scale and log2(e) folded in (the kernels use exp2), and S q'
    (prod mode; q' itself otherwise, unread)."""
    rt = per_codec(
        codec, f"scaled rotation {scale!r}", lambda c: c.rotation.T * (scale * LOG2E)
    )  # one GEMM per call, no separate scaling kernel
    q = query.float() @ rt
    qs = q @ codec.key.qjl.T if codec.layout.prod else q
    return q.contiguous(), qs.contiguous()


def check_gqa(query: torch.Tensor, kv_cache: torch.Tensor, codec: LayerCodec) -> int:
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    if head_dim != codec.head_dim:
        raise ValueError(f"query head_dim {head_dim} != the codec's {codec.head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"query has {num_q_heads} heads, not a multiple of kv_cache's {num_kv_heads} KV heads"
        )
    return num_q_heads // num_kv_heads


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """About four programs per SM (each tile waits on a chain of dependent loads: block
    table, packed bytes, centroid table, so several resident programs hide each other's
    latency), without splits shorter than 256 tokens. From shapes only (no seq_lens read),
    so it costs no device sync."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(4 * sms, batch * num_kv_heads), triton.cdiv(max_len, 256)))


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton decode_attention_reference: query [B, Hq, d] -> [B, Hq, d] in query's dtype.

    num_splits: programs per (sequence, KV head) along the context (None: from the shapes);
    block_n: tokens per tile (a power of two >= 16; tiles may span paged blocks).
    num_stages: software pipelining depth; Triton's default of 3 needs 160 KB of shared
    memory at head_dim 256 (too much beside a second program per SM), 2 needs 98 KB.
    """
    check_cache(kv_cache, codec)
    device = kv_cache.device
    check_tensor("query", query, 3, FLOAT_DTYPES, device)
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
        num_splits = default_num_splits(
            batch, num_kv_heads, block_table.shape[1] * block_size, device
        )
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if batch == 0:
        return torch.empty_like(query)

    constexprs, tables = launch_state(codec)
    q, qs = rotated_queries(query, codec, scale)
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    partial = torch.empty(batch, num_q_heads, num_splits, head_dim, device=device)
    lse = torch.empty(batch, num_q_heads, num_splits, device=device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, qs, kv_cache, block_table, seq_lens, *tables,
        partial, lse, num_q_heads, num_splits, block_table.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), BLOCK_SIZE=block_size,
        G=group, GP=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages, **constexprs,
    )  # fmt: skip
    if num_splits == 1:  # one split per row holds the whole softmax: nothing to merge
        out = partial.view(batch, num_q_heads, head_dim)
    else:
        out = torch.empty(batch, num_q_heads, head_dim, device=device)
        _decode_reduce_kernel[(batch * num_q_heads,)](
            partial, lse, out, num_splits, D=head_dim, SP=triton.next_power_of_2(num_splits)
        )
    return (out @ codec.rotation).to(query.dtype)
