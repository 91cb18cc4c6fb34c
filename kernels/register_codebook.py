"""Codebook lookups without memory: up to 16 float16 centroids held in 8 registers, read with
PTX's byte permute (prmt), for index fields of at most 4 bits.

The memory route (triton_unpack.load_centroids' gathers) sends every pair of indices through a
64-bit address and a load from L1; the lanes of a warp hit different lines of the table, so a
gather is replayed, and each tile's scores wait on that chain. Here the table lives in
registers: prmt picks 4 bytes out of the 8 bytes of two registers by a 16-bit selector of four
3-bit nibbles, so one prmt looks up 4 indices in an 8-entry table of bytes. A 16-entry table of
float16 is 4 byte tables (low and high bytes, entries 0-7 and 8-15); index bit 3 picks between
two lookups with one more prmt. Per 8 indices: 8-12 prmt plus a few shifts, all in registers.

Triton's interpreter has no inline assembly, so it runs emulated_prmt, the same byte selection
written in Triton operations: the interpreter tests then check everything here but the single
prmt instruction, whose meaning is PTX's (prmt.b32 default mode; selector bit 3 is kept clear).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_BITS = 4  # wider fields keep the gathers of triton_unpack.load_centroids
EMULATED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def emulated_prmt(a, b, sel):
    """prmt.b32 in Triton operations: byte k of the result is byte (sel >> 4k) & 7 of the
    64-bit value b:a (a the low word)."""
    src = (b.to(tl.uint64) << 32) | a.to(tl.uint64)
    out = tl.zeros(sel.shape, dtype=tl.uint32)
    for k in tl.static_range(4):
        shift = ((sel >> (4 * k)) & 7).to(tl.uint64) * 8
        out |= ((src >> shift) & 0xFF).to(tl.uint32) << (8 * k)
    return out


@triton.jit
def prmt(a, b, sel, EMULATE: tl.constexpr):
    """Bytes of b:a chosen by sel's four low nibbles (each < 8), as uint32."""
    if EMULATE:
        return emulated_prmt(a, b, sel)
    return tl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=tl.uint32, is_pure=True, pack=1
    )


@triton.jit
def nibbles(lo, BITS: tl.constexpr):
    """The eight BITS-bit indices packed in lo's low 8 * BITS bits, index j moved to nibble j:
    fields spread by 4, 2 and 1 places in three mask-and-shift rounds."""
    if BITS == 4:
        return lo
    gap: tl.constexpr = 4 - BITS
    quad: tl.constexpr = (1 << (4 * BITS)) - 1
    x = (lo & quad) | ((lo << (4 * gap)) & (quad << 16))
    pair: tl.constexpr = (1 << (2 * BITS)) - 1
    x = (x & (pair | (pair << 16))) | ((x << (2 * gap)) & ((pair << 8) | (pair << 24)))
    one: tl.constexpr = (1 << BITS) - 1
    return (x & (one * 0x01010101)) | ((x << gap) & ((one << 4) * 0x01010101))


@triton.jit
def load_register_table(ptr):
    """register_table's 8 words as uint32 scalars (loaded once per program)."""
    return (
        tl.load(ptr).to(tl.uint32, bitcast=True),
        tl.load(ptr + 1).to(tl.uint32, bitcast=True),
        tl.load(ptr + 2).to(tl.uint32, bitcast=True),
        tl.load(ptr + 3).to(tl.uint32, bitcast=True),
        tl.load(ptr + 4).to(tl.uint32, bitcast=True),
        tl.load(ptr + 5).to(tl.uint32, bitcast=True),
        tl.load(ptr + 6).to(tl.uint32, bitcast=True),
        tl.load(ptr + 7).to(tl.uint32, bitcast=True),
    )


@triton.jit
def _lookup4(w, table, BITS: tl.constexpr, EMULATE: tl.constexpr):
    """The centroids of the 4 indices in w's low nibbles as two words of float16 pairs."""
    sel = w & 0x7777
    lo = prmt(table[0], table[1], sel, EMULATE)  # low bytes of entries idx & 7
    hi = prmt(table[4], table[5], sel, EMULATE)  # high bytes
    if BITS == 4:  # index bit 3 picks entries 8-15: byte k from the second word where set
        pick = ((w >> 1) & 0x4444) | 0x3210
        lo = prmt(lo, prmt(table[2], table[3], sel, EMULATE), pick, EMULATE)
        hi = prmt(hi, prmt(table[6], table[7], sel, EMULATE), pick, EMULATE)
    first = prmt(lo, hi, tl.full(w.shape, 0x5140, tl.uint32), EMULATE)  # lo0 hi0 lo1 hi1
    second = prmt(lo, hi, tl.full(w.shape, 0x7362, tl.uint32), EMULATE)  # lo2 hi2 lo3 hi3
    return first, second


@triton.jit
def register_lookup8(lo, table, BITS: tl.constexpr, EMULATE: tl.constexpr):
    """Centroids of the eight BITS-bit indices of each packed group (lo: its low word) as four
    words of float16 pairs (p0 holds indices 0 and 1, low half first; p1 2 and 3; ...)."""
    w = nibbles(lo, BITS)
    p0, p1 = _lookup4(w, table, BITS, EMULATE)
    p2, p3 = _lookup4(w >> 16, table, BITS, EMULATE)
    return p0, p1, p2, p3


def register_table(centroids: torch.Tensor) -> torch.Tensor:
    """int32 [8] for load_register_table: words 0-3 hold the low bytes of the float16
    centroids 0-15 (four per word, entry 4i + k in byte k of word i), words 4-7 their high
    bytes; entries past the codebook are 0 (never selected)."""
    if centroids.numel() > 1 << MAX_BITS:
        raise ValueError(f"a register table holds at most 16 centroids, got {centroids.numel()}")
    half = torch.zeros(16, dtype=torch.int64, device=centroids.device)
    half[: centroids.numel()] = centroids.to(torch.float16).view(torch.int16).to(torch.int64)
    half &= 0xFFFF
    planes = torch.stack([half & 0xFF, half >> 8]).view(2, 4, 4)  # [low/high, word, byte]
    words = (planes << torch.tensor([0, 8, 16, 24], device=centroids.device)).sum(-1).view(8)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
