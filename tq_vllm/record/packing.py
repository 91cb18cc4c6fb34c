"""Bit packing of b-bit indices (b = 1..8) into uint8.

Index j of a row occupies bits [j*b, (j+1)*b) of the row's byte string, least significant
bit first. A row of n indices takes ceil(n*b/8) bytes. Sign bits are 1-bit indices
(1 = non-negative). The Triton kernels read and write exactly this layout.
"""

from __future__ import annotations

import torch

from tq_vllm.quant.centroids import check_bits


def packed_bytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_indices(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer indices < 2^bits -> [..., ceil(n*bits/8)] uint8."""
    check_bits(bits)
    n = indices.shape[-1]
    idx = indices.to(torch.int64)
    if bits == 8:
        return idx.to(torch.uint8)
    if n % 8 == 0:  # fast path: 8 indices fill exactly `bits` bytes, i.e. one int64
        groups = idx.reshape(*idx.shape[:-1], n // 8, 8)
        word = (groups << (torch.arange(8, device=idx.device) * bits)).sum(-1, keepdim=True)
        out = (word >> (torch.arange(bits, device=idx.device) * 8)) & 0xFF
        return out.reshape(*idx.shape[:-1], n * bits // 8).to(torch.uint8)
    nbytes = packed_bytes(n, bits)
    shifts = torch.arange(bits, device=idx.device)
    bitplane = (idx.unsqueeze(-1) >> shifts) & 1  # [..., n, bits]
    stream = bitplane.reshape(*idx.shape[:-1], n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    weights = 1 << torch.arange(8, device=idx.device)
    return (stream.reshape(*idx.shape[:-1], nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_indices: [..., ceil(n*bits/8)] uint8 -> [..., n] int64."""
    check_bits(bits)
    if packed.shape[-1] != packed_bytes(n, bits):
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes per row; {n} indices of {bits} bits need "
            f"{packed_bytes(n, bits)}"
        )
    p = packed.to(torch.int64)
    if bits == 8:
        return p
    if n % 8 == 0:  # fast path, the inverse of pack_indices'
        groups = p.reshape(*p.shape[:-1], n // 8, bits)
        word = (groups << (torch.arange(bits, device=p.device) * 8)).sum(-1, keepdim=True)
        out = (word >> (torch.arange(8, device=p.device) * bits)) & ((1 << bits) - 1)
        return out.reshape(*p.shape[:-1], n)
    stream = (p.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1
    stream = stream.reshape(*p.shape[:-1], -1)[..., : n * bits]
    weights = 1 << torch.arange(bits, device=p.device)
    return (stream.reshape(*p.shape[:-1], n, bits) * weights).sum(-1)


# bits -> (bytes per group, chunks per group): a chunk holds whole indices and is small enough
# to index a table of every possible chunk (at most 2^14 entries).
_CHUNKS = {1: (1, 1), 2: (1, 1), 4: (1, 1), 8: (1, 1), 3: (3, 2), 6: (3, 2), 5: (5, 4), 7: (7, 4)}


def chunk_bits(bits: int) -> int:
    group, chunks = _CHUNKS[bits]
    return 8 * group // chunks


def unpack_chunks(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., nbytes] packed rows (n a multiple of 8) -> integer [..., n * bits / chunk_bits]
    chunks of chunk_bits(bits) bits, each holding whole consecutive indices, LSB first. A
    table lookup per chunk then decodes several indices at once (see chunk_table)."""
    group, chunks = _CHUNKS[bits]
    p = packed.to(torch.int32 if group <= 3 else torch.int64)  # a group's bits fit the word
    if group == 1:
        return p
    words = p.reshape(*p.shape[:-1], p.shape[-1] // group, group)
    word = words[..., 0]
    for i in range(1, group):
        word = word | (words[..., i] << (8 * i))
    width = 8 * group // chunks
    mask = (1 << width) - 1
    out = torch.stack([(word >> (j * width)) & mask for j in range(chunks)], dim=-1)
    return out.reshape(*p.shape[:-1], p.shape[-1] // group * chunks)


def chunk_table(values: torch.Tensor, bits: int) -> torch.Tensor:
    """values [2^bits] -> [2^chunk_bits, chunk_bits / bits]: the values of every index a
    chunk holds, for every possible chunk."""
    width = chunk_bits(bits)
    chunk = torch.arange(1 << width, device=values.device).unsqueeze(1)
    shifts = torch.arange(width // bits, device=values.device) * bits
    return values[(chunk >> shifts) & ((1 << bits) - 1)]


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """[..., n] real -> [..., ceil(n/8)] uint8 of sign bits (1 where x >= 0)."""
    return pack_indices((x >= 0).to(torch.int64), 1)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[..., ceil(n/8)] uint8 -> [..., n] float32 of +-1."""
    return unpack_indices(packed, 1, n).to(torch.float32) * 2 - 1
