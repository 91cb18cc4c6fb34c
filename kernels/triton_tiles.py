"""Triton tile helpers shared by the store, decode and context kernels: fp16 fields, record
pointers through the block table, and the score / value tiles of one block of compressed
tokens (their index fields unpacked by triton_unpack.py). The byte offsets they read come from
the record layout (tq_vllm/record/layout.py) as constexprs (layout_constexprs), never restated.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from tq_vllm.kernels.common import per_codec
from tq_vllm.kernels.register_codebook import MAX_BITS, register_table
from tq_vllm.kernels.triton_unpack import centroid_table, load_centroids, load_signs
from tq_vllm.quant.quantizer import FP16_MAX as _FP16_MAX
from tq_vllm.record.codec import LayerCodec

LOG2E = 1.4426950408889634
FP16_MAX = tl.constexpr(_FP16_MAX)  # a constexpr: jit code may read it


@triton.jit
def store_fp16(ptr, x, mask):
    # Records have any byte length, so a 2-byte field may be unaligned: write it bytewise.
    bits = x.to(tl.float16).to(tl.uint16, bitcast=True)
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def fp16_norm(n):
    # quantizer.to_fp16_norm: non-finite (NaN fails the comparison too) -> 0, else saturate.
    return tl.where(n < float("inf"), tl.minimum(n, FP16_MAX), 0.0)


@triton.jit
def load_fp16(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_rows(ptr, rows, rmask, WIDTH: tl.constexpr):
    """Rows `rows` of a contiguous float32 [*, WIDTH] tensor as fp16 [len(rows), WIDTH]; 0
    where rmask is false."""
    cols = tl.arange(0, WIDTH)
    x = tl.load(ptr + rows[:, None] * WIDTH + cols[None, :], mask=rmask[:, None], other=0.0)
    return x.to(tl.float16)


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
def _scaled_dot(q, tile, norm, NORM_ON_TILE: tl.constexpr):
    """q [M, K] . (norm_n tile[n]) [BLOCK_N, K]^T -> [M, BLOCK_N], fp16 operands."""
    if NORM_ON_TILE:
        return tl.dot(q, tl.trans(tile * norm.to(tl.float16)[:, None]))
    return tl.dot(q, tl.trans(tile)) * norm[None, :]


@triton.jit
def score_tile(
    q,
    qs,
    rec,
    tmask,
    kcent,
    kocent,
    KEY_NORM_OFF: tl.constexpr,
    KEY_RNORM_OFF: tl.constexpr,
    KEY_IDX_OFF: tl.constexpr,
    KEY_SIGN_OFF: tl.constexpr,
    KEY_ONORM_OFF: tl.constexpr,
    KEY_OIDX_OFF: tl.constexpr,
    D: tl.constexpr,
    KEY_BITS: tl.constexpr,
    PROD: tl.constexpr,
    QJL_COEF: tl.constexpr,
    KEY_N: tl.constexpr,
    KEY_OUTLIERS: tl.constexpr,
    KEY_OUTLIER_BITS: tl.constexpr,
    NORM_ON_TILE: tl.constexpr = False,
    REGISTER_CODEBOOK: tl.constexpr = False,
    WORDS: tl.constexpr = False,
):
    """Scores [M, BLOCK_N] of fp16 rotated queries against the compressed keys at rec
    [BLOCK_N]; -inf where tmask is false. Plain keys: q [M, D] (qs = S q', prod mode). Split
    keys (KEY_OUTLIERS > 0): q holds the regular part of M_h q' (its KEY_N columns, zero-padded
    to a power of two), qs the outlier part (likewise), each scored against its own run.
    kcent, kocent: the key parts' codebooks (codebook_for); REGISTER_CODEBOOK and WORDS as in
    load_centroids.

    NORM_ON_TILE scales the [BLOCK_N, D] tiles by the norms before the dots instead of the
    scores after them. Needed where M >= 64 (wgmma, B operand in shared memory): Triton 3.6
    folds a join/reshape tile straight into its shared-memory copy and builds an illegal rank-5
    NVMMA layout, so an op must sit between the reshape and the dot. Elsewhere it only costs
    instructions (the tile has more elements than the scores)."""
    if KEY_BITS > 0:
        norm = load_fp16(rec + KEY_NORM_OFF, tmask)
        kc = load_centroids(
            rec, tmask, kcent, KEY_IDX_OFF, q.shape[1], KEY_BITS, KEY_N, REGISTER_CODEBOOK, WORDS
        )
        s = _scaled_dot(q, kc, norm, NORM_ON_TILE)
    else:
        s = tl.zeros([q.shape[0], rec.shape[0]], dtype=tl.float32)
    if PROD:  # +-rnorm is exact in fp16
        rnorm = load_fp16(rec + KEY_RNORM_OFF, tmask)
        signs = load_signs(rec, tmask, KEY_SIGN_OFF, D)
        s += _scaled_dot(qs, signs, rnorm, NORM_ON_TILE) * QJL_COEF
    if KEY_OUTLIERS > 0:
        onorm = load_fp16(rec + KEY_ONORM_OFF, tmask)
        oc = load_centroids(
            rec,
            tmask,
            kocent,
            KEY_OIDX_OFF,
            qs.shape[1],
            KEY_OUTLIER_BITS,
            KEY_OUTLIERS,
            REGISTER_CODEBOOK,
            WORDS,
        )
        s += _scaled_dot(qs, oc, onorm, NORM_ON_TILE)
    return tl.where(tmask[None, :], s, float("-inf"))


@triton.jit
def value_tile(
    p,
    rec,
    tmask,
    vcent,
    VALUE_NORM_OFF: tl.constexpr,
    VALUE_IDX_OFF: tl.constexpr,
    D: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    NORM_ON_TILE: tl.constexpr = False,
    REGISTER_CODEBOOK: tl.constexpr = False,
    WORDS: tl.constexpr = False,
):
    """sum_n p[:, n] * norm_n * c[idx_n]: [M, D] for weights p [M, BLOCK_N]. NORM_ON_TILE,
    REGISTER_CODEBOOK, WORDS: as in score_tile; vcent: the values' codebook (codebook_for)."""
    norm = load_fp16(rec + VALUE_NORM_OFF, tmask)
    vc = load_centroids(
        rec, tmask, vcent, VALUE_IDX_OFF, D, VALUE_BITS, D, REGISTER_CODEBOOK, WORDS
    )
    if NORM_ON_TILE:
        return tl.dot(p.to(tl.float16), vc * norm.to(tl.float16)[:, None])
    return tl.dot((p * norm[None, :]).to(tl.float16), vc)


@triton.jit
def values_needed(s, m_new, rmask, SPARSE_V_LOG2: tl.constexpr):
    """Sparse V: whether some row's weights in the tile reach 2^SPARSE_V_LOG2 times its running
    maximum m_new (scores s [M, BLOCK_N] in log2 units); a tile none reaches adds nothing worth
    its values (its weights still count in the softmax sum)."""
    top = tl.max(s, axis=1)
    gap = tl.where(rmask & (top > float("-inf")), top - m_new, float("-inf"))
    return tl.max(gap, axis=0) >= SPARSE_V_LOG2


def sparse_v_constexprs(sparse_v: float) -> dict:
    """The kernels' sparse-V constexprs for a threshold in [0, 1) (0: off)."""
    if not 0.0 <= sparse_v < 1.0:
        raise ValueError(f"sparse_v must lie in [0, 1), got {sparse_v}")
    return dict(SPARSE_V=sparse_v > 0, SPARSE_V_LOG2=math.log2(sparse_v) if sparse_v else 0.0)


def key_tiles(codec: LayerCodec) -> tuple[int, int]:
    """Widths of the query tiles a key is scored with (powers of two): (regular part, qs). Plain
    keys: (d, d); split keys: their regular and outlier channel counts, rounded up."""
    layout = codec.layout
    if not layout.split_keys:
        return layout.head_dim, layout.head_dim
    return (
        triton.next_power_of_2(layout.key_regular_channels),
        triton.next_power_of_2(layout.key_outliers),
    )


def layout_constexprs(codec: LayerCodec) -> dict:
    """The record layout's fields the Triton kernels read, as their constexprs."""
    layout = codec.layout
    key_tile, qs_tile = key_tiles(codec)
    return dict(
        KEY_BITS=layout.key_index_bits,
        PROD=layout.prod,
        VALUE_BITS=layout.value_bits,
        KEY_NORM_OFF=layout.key_norm,
        KEY_RNORM_OFF=layout.key_residual_norm,
        VALUE_NORM_OFF=layout.value_norm,
        KEY_IDX_OFF=layout.key_indices,
        KEY_SIGN_OFF=layout.key_signs,
        VALUE_IDX_OFF=layout.value_indices,
        KEY_N=layout.key_regular_channels,
        KEY_OUTLIERS=layout.key_outliers,
        KEY_OUTLIER_BITS=layout.key_outlier_bits,
        KEY_ONORM_OFF=layout.key_outlier_norm,
        KEY_OIDX_OFF=layout.key_outlier_indices,
        KEY_TILE=key_tile,
        QS_TILE=qs_tile,
    )


def _launch_state(
    codec: LayerCodec, register_codebook: bool
) -> tuple[dict, tuple[torch.Tensor, ...]]:
    layout = codec.layout

    def table(centroids: torch.Tensor, bits: int) -> torch.Tensor:
        if register_codebook and 0 < bits <= MAX_BITS:  # as codebook_for
            return register_table(centroids)
        return centroid_table(centroids, bits)

    key = codec.key
    regular = key.regular if layout.split_keys else key
    key_table = table(regular.centroids, layout.key_index_bits)
    outlier_table = (  # unread for plain keys
        table(key.outlier.centroids, layout.key_outlier_bits) if layout.split_keys else key_table
    )
    tables = (key_table, table(codec.value.centroids, layout.value_bits), outlier_table)
    qjl_coef = math.sqrt(math.pi / 2) / codec.head_dim
    return {**layout_constexprs(codec), "QJL_COEF": qjl_coef}, tables


def launch_state(
    codec: LayerCodec, register_codebook: bool = False
) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """(layout_constexprs and QJL_COEF, (key, value, outlier key table)) of the attention
    kernels, built once. register_codebook: codebooks of up to 16 entries go to
    registers (load_centroids)."""
    return per_codec(
        codec,
        f"attention register_codebook={register_codebook}",
        lambda c: _launch_state(c, register_codebook),
    )


def word_aligned(kv_cache: torch.Tensor) -> bool:
    """Whether every record of the cache starts on a 4-byte boundary (load_centroids' WORDS)."""
    return kv_cache.data_ptr() % 4 == 0 and all(s % 4 == 0 for s in kv_cache.stride()[:3])


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()


def rotated_queries(
    query: torch.Tensor, codec: LayerCodec, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', q, qs), float32 [T, H, *]: q' the query in its keys' rotated domain (R q; M_h q for
    split keys) with softmax scale and log2(e) folded in (the kernels use exp2); q and qs the
    score_tile operands: q' and S q' (prod mode; q' otherwise, unread) for plain keys, q'
    split into its regular and outlier columns (zero-padded to key_tiles) for split keys."""
    if codec.layout.split_keys:
        q = codec.rotate_queries(query) * (scale * LOG2E)
        regular = codec.layout.key_regular_channels
        key_tile, qs_tile = key_tiles(codec)
        parts = _pad_columns(q[..., :regular], key_tile), _pad_columns(q[..., regular:], qs_tile)
        return q, *parts
    rt = per_codec(
        codec, f"scaled rotation {scale!r}", lambda c: c.rotation.T * (scale * LOG2E)
    )  # one GEMM per call, no separate scaling kernel
    q = (query.float() @ rt).contiguous()
    qs = (q @ codec.key.qjl.T).contiguous() if codec.layout.prod else q
    return q, q, qs
