"""Store as one Triton kernel: quantize and pack every token's record in one launch (the
contract: reference.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tq_vllm.kernels.common import check_cache, check_store_inputs, per_codec
from tq_vllm.kernels.triton_tiles import fp16_norm, key_tiles, layout_constexprs, store_fp16
from tq_vllm.record.codec import LayerCodec


@triton.jit
def _pack_store(
    idx, ptr, mask, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, USED: tl.constexpr
):  # fmt: skip
    """idx [ROWS, N] (< 2^BITS) -> packed bytes at ptr [ROWS] (the layout of
    tq_vllm/record/packing.py), the first USED <= N indices' ceil(USED * BITS / 8) of them
    (columns from USED on must hold 0: they fill the last byte's spare bits).

    Eight BITS-bit indices fill exactly BITS bytes: assemble them as one little-endian int64
    word, then split the word into bytes.
    """
    groups = tl.reshape(idx.to(tl.int64), [ROWS, N // 8, 8])
    shifts = (tl.arange(0, 8) * BITS).to(tl.int64)
    word = tl.sum(groups << shifts[None, None, :], axis=2)  # disjoint bits: sum == or
    k = tl.arange(0, 8)
    out = (word[:, :, None] >> (k * 8).to(tl.int64)[None, None, :]) & 0xFF
    offs = (tl.arange(0, N // 8) * BITS)[None, :, None] + k[None, None, :]
    written = (k < BITS)[None, None, :]
    if USED < N:
        written = written & (offs < (USED * BITS + 7) // 8)
    tl.store(ptr[:, None, None] + offs, out.to(tl.uint8), mask=mask[:, None, None] & written)


@triton.jit
def _quantize_store(
    x_row,
    tmask,
    rec,
    rot_ptr,
    cent_ptr,
    bnd_ptr,
    qjl_ptr,
    channel_ptr,
    NORM_OFF: tl.constexpr,
    IDX_OFF: tl.constexpr,
    RNORM_OFF: tl.constexpr,
    SIGN_OFF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    D: tl.constexpr,
    NC: tl.constexpr,
    BITS: tl.constexpr,
    PROD: tl.constexpr,
    N: tl.constexpr,
    NP: tl.constexpr,
    PART: tl.constexpr,
):
    """Quantize the vectors at x_row [BLOCK_T] (pointers to D contiguous elements) as
    quantizer.TurboQuantizer.quantize does and write the fields into the records at rec
    [BLOCK_T]. BITS are the mse stage's (0: 1-bit prod). rot_ptr: the rotation's first N rows,
    [NP, D] (NP = N = D for a whole vector; zero rows pad a split key's part to a power of two).
    PART: a split key's part, whose norm is over the channels where channel_ptr [D] is 1.

    The two matrix products (rotation, QJL projection) run on tensor cores as 3xTF32, which
    is as accurate as float32 here (plain TF32 would flip many indices against the float32
    reference; the former exact FMA dots spilled registers and took most of the time and of
    the compile time). Each is split in NC-wide slices so that a matrix tile fits in shared
    memory at d=256.
    """
    d = tl.arange(0, NP)
    y = tl.zeros([BLOCK_T, NP], dtype=tl.float32)
    xsq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c0 in tl.static_range(0, D, NC):  # y = x @ R^T, one slice of x's columns at a time
        k = c0 + tl.arange(0, NC)
        xc = tl.load(x_row[:, None] + k[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        if PART:  # a NaN or inf elsewhere still spreads (x 0 = NaN): both parts read back 0
            xsq += tl.sum(xc * xc * tl.load(channel_ptr + k)[None, :], axis=1)
        else:
            xsq += tl.sum(xc * xc, axis=1)
        r_cols = tl.load(rot_ptr + d[:, None] * D + k[None, :])  # R[:, c0..c0+NC], by rows
        y = tl.dot(xc, tl.trans(r_cols), y, input_precision="tf32x3")
    xnorm = tl.sqrt(xsq)
    # ||R x|| differs from ||x|| in the last bits; the reference divides by the former.
    # Approximate square roots and divisions (an ulp or two of float32) change an index only
    # within ~1e-7 of a boundary and a norm only at an fp16 rounding tie (the tests allow
    # both); the correctly rounded ones compile to slow-path calls.
    ynorm = tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), 1e-30)
    u = y * tl.fdiv(tl.full(ynorm.shape, 1.0, tl.float32), ynorm, ieee_rounding=False)[:, None]
    r = y
    if BITS > 0:
        # Binary search over the sorted midpoints: idx = #{boundaries < u}, as bucketize.
        idx = tl.zeros([BLOCK_T, NP], dtype=tl.int32)
        for s in tl.static_range(BITS):
            cand = idx + (1 << (BITS - 1 - s))
            idx = tl.where(u > tl.load(bnd_ptr + cand - 1), cand, idx)
        if N < NP:
            idx = tl.where(d[None, :] < N, idx, 0)
        _pack_store(idx, rec + IDX_OFF, tmask, BLOCK_T, NP, BITS, N)
        c = tl.load(cent_ptr + idx)
        if N < NP:
            c = tl.where(d[None, :] < N, c, 0.0)
    if PROD:
        norm = fp16_norm(xnorm).to(tl.float16)
        store_fp16(rec + NORM_OFF, norm, tmask)
        if BITS > 0:  # the residual of the stored (rounded) norm, as the reference's
            r = y - norm.to(tl.float32)[:, None] * c
        store_fp16(rec + RNORM_OFF, fp16_norm(tl.sqrt(tl.sum(r * r, axis=1))), tmask)
        for c0 in tl.static_range(0, D, NC):  # sign(r @ S^T), one slice of columns at a time
            k = c0 + tl.arange(0, NC)
            s_rows = tl.load(qjl_ptr + k[:, None] * D + d[None, :])  # S rows c0..c0+NC
            proj = tl.dot(r, tl.trans(s_rows), input_precision="tf32x3")
            signs = (proj >= 0).to(tl.int32)
            _pack_store(signs, rec + SIGN_OFF + c0 // 8, tmask, BLOCK_T, NC, 1, NC)
    else:  # norm correction: TurboQuantizer._gain_norms, gain "norm" (0 norm: divide by 1)
        cnorm = tl.sqrt(tl.sum(c * c, axis=1))
        cnorm = tl.where(cnorm > 0, cnorm, 1.0)
        norm = tl.fdiv(xnorm, cnorm, ieee_rounding=False)
        store_fp16(rec + NORM_OFF, fp16_norm(norm), tmask)


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    cache_ptr,
    slot_ptr,
    rot_ptr,
    kcent_ptr,
    kbnd_ptr,
    qjl_ptr,
    vcent_ptr,
    vbnd_ptr,
    krot_ptr,
    korot_ptr,
    kocent_ptr,
    kobnd_ptr,
    channel_ptr,
    num_tokens,
    key_st,
    key_sh,
    value_st,
    value_sh,
    cache_sb,
    cache_sh,
    cache_ss,
    block_size,
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
    BLOCK_T: tl.constexpr,
    D: tl.constexpr,
    NC: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    slot = tl.load(slot_ptr + t, mask=t < num_tokens, other=-1).to(tl.int64)
    tmask = slot >= 0
    slot = tl.maximum(slot, 0)
    rec = (
        cache_ptr
        + (slot // block_size) * cache_sb
        + h.to(tl.int64) * cache_sh
        + (slot % block_size) * cache_ss
    )
    t64 = t.to(tl.int64)
    key_row = key_ptr + t64 * key_st + h * key_sh
    if KEY_OUTLIERS > 0:  # each part through its rows of M_h (split_key_state)
        _quantize_store(
            key_row, tmask, rec, krot_ptr + h * KEY_TILE * D, kcent_ptr, kbnd_ptr, qjl_ptr,
            channel_ptr + h * D, KEY_NORM_OFF, KEY_IDX_OFF, 0, 0, BLOCK_T, D, NC, KEY_BITS,
            False, KEY_N, KEY_TILE, True,
        )  # fmt: skip
        _quantize_store(
            key_row, tmask, rec, korot_ptr + h * QS_TILE * D, kocent_ptr, kobnd_ptr, qjl_ptr,
            channel_ptr + (num_heads + h) * D, KEY_ONORM_OFF, KEY_OIDX_OFF, 0, 0, BLOCK_T, D,
            NC, KEY_OUTLIER_BITS, False, KEY_OUTLIERS, QS_TILE, True,
        )  # fmt: skip
    else:
        _quantize_store(
            key_row, tmask, rec, rot_ptr, kcent_ptr, kbnd_ptr, qjl_ptr, rot_ptr, KEY_NORM_OFF,
            KEY_IDX_OFF, KEY_RNORM_OFF, KEY_SIGN_OFF, BLOCK_T, D, NC, KEY_BITS, PROD, D, D, False,
        )  # fmt: skip
    _quantize_store(
        value_ptr + t64 * value_st + h * value_sh, tmask, rec, rot_ptr, vcent_ptr, vbnd_ptr,
        qjl_ptr, rot_ptr, VALUE_NORM_OFF, VALUE_IDX_OFF, 0, 0, BLOCK_T, D, NC, VALUE_BITS,
        False, D, D, False,
    )  # fmt: skip


def split_key_state(codec: LayerCodec) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What the kernel needs of split keys (quant/outliers.py): each part's rows of every
    head's M_h, zero-padded to key_tiles' widths ([Hk, tile, d] each), and the parts' channel
    masks, float32 [2, Hk, d] (1 at the regular, then at the outlier channels of each head)."""
    m = codec.key.rotation
    regular = codec.layout.key_regular_channels
    rotations = []
    for rows, tile in zip((m[:, :regular], m[:, regular:]), key_tiles(codec), strict=True):
        rotations.append(torch.nn.functional.pad(rows, (0, 0, 0, tile - rows.shape[1])))
    is_regular = torch.zeros_like(m[:, 0])
    is_regular.scatter_(1, codec.key.order[:, :regular], 1.0)
    return (rotations[0].contiguous(), rotations[1].contiguous()), torch.stack(
        [is_regular, 1 - is_regular]
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
    block_t: int = 16,
    num_warps: int = 8,
) -> None:
    """Triton store_kv_reference: one launch quantizes and writes every token's record.

    block_t: tokens per program (>= 16, a power of two: the rotation is a tl.dot).
    num_warps: 8 keeps the [block_t, d] tiles of a program within the registers at d >= 128
    (4 spilled; measured by compiling for sm_90).
    """
    check_cache(kv_cache, codec)
    check_store_inputs(key, value, kv_cache, slot_mapping, codec)
    num_tokens, num_heads, head_dim = key.shape
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
    if num_tokens == 0:
        return
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    layout = codec.layout
    if layout.split_keys:
        regular, outlier = codec.key.regular, codec.key.outlier
        key_args = (regular.centroids, regular.boundaries, codec.rotation)  # no QJL: unread
        rotations, channels = per_codec(codec, "split key store", split_key_state)
        split_args = (*rotations, outlier.centroids, outlier.boundaries, channels)
    else:
        qjl = codec.key.qjl if layout.prod else codec.rotation  # unread in mse mode
        key_args = (codec.key.centroids, codec.key.boundaries, qjl)
        split_args = (codec.rotation,) * 5  # unread
    _store_kv_kernel[(triton.cdiv(num_tokens, block_t), num_heads)](
        key, value, kv_cache, slot_mapping.contiguous(), codec.rotation, *key_args,
        codec.value.centroids, codec.value.boundaries, *split_args,
        num_tokens, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.shape[2],
        BLOCK_T=block_t, D=head_dim, NC=64, **layout_constexprs(codec),
        num_warps=num_warps,
    )  # fmt: skip
