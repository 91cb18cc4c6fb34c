"""Triton helpers that turn a record's packed index fields into float16 tiles: each group of
eight indices as a word pair, centroid lookups (a pair table gathered from memory, or the
register codebook of register_codebook.py), and the QJL sign bits. The packing is
tq_vllm/record/packing.py's; the offsets come in as constexprs (triton_tiles.layout_constexprs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tq_vllm.kernels.register_codebook import EMULATED, load_register_table, register_lookup8


@triton.jit
def _group_words(
    rec, tmask, OFF: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, N: tl.constexpr,
    WORDS: tl.constexpr = False,
):  # fmt: skip
    """The packed field at rec + OFF (tq_vllm/record/packing.py's layout) as words
    [BLOCK_N, D // 8] x 2. The field holds N <= D indices (N < D: a split key's part, its tile
    padded to a power of two); bytes past its ceil(N * BITS / 8) read as 0.

    Eight BITS-bit indices fill exactly BITS bytes, least significant bit first: each group of
    eight is one little-endian word of 8 * BITS bits, returned as its low and high 32 bits.
    Byte k of every group is one [BLOCK_N, D // 8] load, so a lane holds whole groups and
    unpacking needs no data from other lanes. (One or two byte loads per index made the
    kernel instruction-bound, far below HBM speed.) WORDS: every record starts on a 4-byte
    boundary (word_aligned), so a 4-bit group at an aligned offset is one 32-bit load.
    """
    first = (tl.arange(0, D // 8) * BITS)[None, :]
    grp = rec[:, None] + OFF + first
    if WORDS and BITS == 4 and N == D and OFF % 4 == 0:  # each group one aligned word
        lo = tl.load(grp.to(tl.pointer_type(tl.uint32)), mask=tmask[:, None], other=0)
        return lo, tl.zeros_like(lo)
    lo = tl.zeros(grp.shape, dtype=tl.uint32)
    hi = tl.zeros(grp.shape, dtype=tl.uint32)
    for k in tl.static_range(BITS):
        mask = tmask[:, None]
        if N < D:
            mask = mask & (first + k < (N * BITS + 7) // 8)
        byte = tl.load(grp + k, mask=mask, other=0).to(tl.uint32)
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
def load_centroids(
    rec, tmask, codebook, OFF: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    N: tl.constexpr, REGISTER_CODEBOOK: tl.constexpr = False,
    WORDS: tl.constexpr = False,
):  # fmt: skip
    """c[idx] [BLOCK_N, D] (float16) for the N <= D BITS-bit indices packed at rec + OFF
    (columns from N on: c[0], to be met by zero query columns).

    codebook is what codebook_for gives. For BITS <= 4 with REGISTER_CODEBOOK: the 8 words of
    register_codebook.register_table; the lookups stay in registers (byte permutes), and
    4-bit groups are read as whole words where WORDS. Otherwise a pointer to
    centroid_table(centroids, BITS): for BITS <= 4 it holds both centroids of every pair of
    adjacent indices (2 * BITS contiguous bits of the word), so one gather fetches two values;
    the gathers and their 64-bit addresses are most of the work per index.
    """
    lo, hi = _group_words(rec, tmask, OFF, D, BITS, N, REGISTER_CODEBOOK and WORDS)
    # One return: the compiler reads the code after a constexpr branch that returned. Up to 4
    # bits (register_codebook.MAX_BITS) both the pair table and the register table apply.
    if BITS > 4:
        c = _interleave8(
            _centroid(lo, hi, codebook, 0, BITS), _centroid(lo, hi, codebook, 1, BITS),
            _centroid(lo, hi, codebook, 2, BITS), _centroid(lo, hi, codebook, 3, BITS),
            _centroid(lo, hi, codebook, 4, BITS), _centroid(lo, hi, codebook, 5, BITS),
            _centroid(lo, hi, codebook, 6, BITS), _centroid(lo, hi, codebook, 7, BITS), D,
        )  # fmt: skip
    else:
        if REGISTER_CODEBOOK:
            p0, p1, p2, p3 = register_lookup8(lo, codebook, BITS, EMULATED)
        else:
            p0 = tl.load(codebook + _group_index(lo, hi, 0, 2 * BITS))
            p1 = tl.load(codebook + _group_index(lo, hi, 1, 2 * BITS))
            p2 = tl.load(codebook + _group_index(lo, hi, 2, 2 * BITS))
            p3 = tl.load(codebook + _group_index(lo, hi, 3, 2 * BITS))
        c = _interleave8(
            _half(p0, 0), _half(p0, 1), _half(p1, 0), _half(p1, 1),
            _half(p2, 0), _half(p2, 1), _half(p3, 0), _half(p3, 1), D,
        )  # fmt: skip
    return c


@triton.jit
def codebook_for(ptr, REGISTER_CODEBOOK: tl.constexpr, BITS: tl.constexpr):
    """What load_centroids takes as a field's codebook, from the table pointer the wrapper
    passed (launch_state's tables): the register words where they apply, else the pointer."""
    # One return: the compiler unifies the types of all of them, constexpr branches included.
    # A 0-bit field (plain keys' outlier part, 1-bit prod keys) is never looked up.
    if REGISTER_CODEBOOK and BITS > 0 and BITS <= 4:  # register_codebook.MAX_BITS
        codebook = load_register_table(ptr)
    else:
        codebook = ptr
    return codebook


@triton.jit
def _sign(lo, J: tl.constexpr):
    return (_group_index(lo, lo, J, 1) * 2 - 1).to(tl.float16)


@triton.jit
def load_signs(rec, tmask, OFF: tl.constexpr, D: tl.constexpr):
    """The QJL sign bits at rec + OFF as +-1 [BLOCK_N, D] (float16)."""
    lo, _ = _group_words(rec, tmask, OFF, D, 1, D)
    return _interleave8(
        _sign(lo, 0), _sign(lo, 1), _sign(lo, 2), _sign(lo, 3),
        _sign(lo, 4), _sign(lo, 5), _sign(lo, 6), _sign(lo, 7), D,
    )  # fmt: skip


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
