"""Temporal tiers: each query reads its newest tokens exactly, older tokens compressed.

The rule (ExactRule) is a function of positions only, so where every row reads by it (decode
rows; prefill rows with the config's window_prefill "decode") chunked prefill, prefix-cache hits,
preemption and speculative verify steps give the same result as one long prefill: a query at
position p reads positions s(p) .. p from the model-dtype keys and values, and positions < s(p)
from the compressed records (which every token still gets), where

    s(p) = max(floor(p / G) * G - (W - G), floor(p / A) * A)

W the window (at most W exact positions), G = W / 4 its grain (rows of one G-aligned group
share s, so that a prefill chunk attends in groups) and A the anchor, vLLM's block size: a
prefix-cache hit starts at a block, and nothing after it reads exactly what a ring of the new
request has not stored. Away from an anchor a row reads its newest W - G + 1 .. W tokens
exactly; the first rows after one read back to it only (1 .. W).

Where the exact tokens live: a ring of R >= W slots per request and layer, position t at slot
t mod R, K and V side by side ([num_rings, Hk, R, 2d], the model dtype, or bf16 where a float32
ring would outgrow a block of records: plugin/exact_ring.py). A step reads the ring
for the exact tokens of its first row that earlier steps stored, and the step's own keys and
values for the rest (rounded to the ring's dtype, so a token reads the same whichever step
stored it), attends, then writes its own last R tokens (so a long chunk never overwrites what
it still reads). R = W + the speculative lookahead keeps a rejected draft from overwriting a
slot that a later query reads.

How one step attends: the compressed kernels attend each row over positions < s(p) and return
their log-sum-exp (-inf where s(p) = 0); each row then attends over its at most W exact keys
(the ring's, then the step's own) and the two merge by their log-sum-exps: exact_merge_reference
here, window/exact.cpp on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch


@dataclass(frozen=True)
class ExactRule:
    """Which positions a query reads exactly (the module's docstring has the rule)."""

    window: int  # W: a power of two
    anchor: int  # A: vLLM's block size, a multiple of W

    def __post_init__(self) -> None:
        if self.window < 1 or self.window & (self.window - 1) or self.anchor % self.window:
            raise ValueError(
                f"an exact window must be a power of two dividing the block size, got "
                f"window {self.window}, block size {self.anchor}"
            )

    @property
    def grain(self) -> int:
        return max(1, self.window // 4)

    def start(self, positions: Any) -> Any:
        """s(p), for an int or an integer tensor of positions."""
        g = self.grain
        recent = positions // g * g - (self.window - g)
        anchored = positions // self.anchor * self.anchor
        if isinstance(positions, torch.Tensor):
            return torch.maximum(recent, anchored)
        return max(recent, anchored)


class FirstRow(NamedTuple):
    """A sequence's first row this step, on the host (its prefill chunk's exact part)."""

    start: int  # s(p): where its exact keys begin
    ring_reads: int  # its exact entries read from the ring
    ring: int  # the sequence's ring


@dataclass
class ExactIndex:
    """Where one step's exact keys come from, built once per step (host tensors, shared by
    every layer). Row r (position p) reads visible[r] = p - s(p) + 1 exact entries: the first
    ring_reads[r] from its ring row_ring[r] (positions s(p) .., stored by earlier steps), the
    rest from the step's own rows r - visible[r] + 1 + ring_reads[r] .. r."""

    row_seq: torch.Tensor  # int64 [T]: each row's sequence
    segment_starts: torch.Tensor  # int32 [T]: s(p) per row, where its exact keys begin
    visible: torch.Tensor  # int64 [T]: p - s(p) + 1
    row_ring: torch.Tensor  # int64 [T]: the ring of each row's sequence
    ring_reads: torch.Tensor  # int64 [T]: the row's exact entries read from the ring
    write_tokens: torch.Tensor  # int64 [N]: the step's tokens written to the ring afterwards
    write_blocks: torch.Tensor  # int64 [N]
    write_slots: torch.Tensor  # int64 [N]
    longest_segment_start: int  # max s(p): sizes the Triton decode's splits
    seq_rows: tuple[int, ...]  # host: each sequence's rows this step
    seq_lens: tuple[int, ...]  # host: each sequence's length after this step
    first_rows: tuple[FirstRow, ...]  # host: each sequence's first row (what a chunk reads)

    @property
    def one_row_each(self) -> bool:
        """A decode step: every sequence has one row (so rows follow block_table's order)."""
        return bool(self.seq_rows) and self.seq_rows.count(1) == len(self.seq_rows)

    def to(self, device: torch.device) -> ExactIndex:
        """The index with its tensors on the device that attends (one copy per step)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


EXACT_ROWS = 256  # rows attended together by exact_attention


def exact_index(
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    rings: torch.Tensor,
    rule: ExactRule,
    ring_size: int,
) -> ExactIndex:
    """query_start_loc [B + 1] and seq_lens [B] as vLLM gives them (host tensors), rings [B]:
    each sequence's ring; ring size R >= W."""
    if ring_size < rule.window:
        raise ValueError(f"a ring of {ring_size} slots cannot hold a {rule.window}-token window")
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    lens = seq_lens.long()
    chunk = lens - q_lens  # each sequence's first position this step
    seq = torch.repeat_interleave(torch.arange(len(lens)), q_lens)
    positions = chunk[seq] + _ranks(q_lens)
    segment = rule.start(positions)
    first_start = rule.start(chunk)
    written = torch.minimum(q_lens, torch.full_like(q_lens, ring_size))
    write_seq = torch.repeat_interleave(torch.arange(len(lens)), written)
    write_pos = lens[write_seq] - written[write_seq] + _ranks(written)
    return ExactIndex(
        row_seq=seq,
        segment_starts=segment.to(torch.int32),
        visible=positions - segment + 1,
        row_ring=rings.long()[seq],
        ring_reads=(chunk[seq] - segment).clamp(min=0),
        write_tokens=starts[write_seq] + write_pos - chunk[write_seq],
        write_blocks=rings.long()[write_seq],
        write_slots=write_pos % ring_size,
        longest_segment_start=int(segment.max()) if len(segment) else 0,
        seq_rows=tuple(q_lens.tolist()),
        seq_lens=tuple(lens.tolist()),
        # Host ints: read per chunk and layer, a tensor's item costs 10-20 us in a served step.
        first_rows=tuple(
            FirstRow(*row)
            for row in zip(
                first_start.tolist(), (chunk - first_start).clamp(min=0).tolist(), rings.tolist()
            )
        ),
    )


def _ranks(counts: torch.Tensor) -> torch.Tensor:
    """0 .. counts[i] - 1 for each i, concatenated."""
    total = int(counts.sum())
    firsts = torch.cumsum(counts, 0) - counts
    return torch.arange(total) - torch.repeat_interleave(firsts, counts)


def _as_ring_holds(rows: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """The step's own keys or values rounded to the ring's dtype, as the ring holds them, in
    their own dtype (the rows themselves where the dtypes agree)."""
    return rows.to(ring.dtype).to(rows.dtype)


def sequence_exact(
    key: torch.Tensor, value: torch.Tensor, ring: torch.Tensor, index: ExactIndex, b: int, lo: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's exact keys and values, each [ring_reads + rows, Hk, d] in key's dtype, for
    its rows of the step (from row lo): positions s(first row) .. last row. With no ring reads
    and a ring of key's dtype they are views of key and value (no copy: a prefill chunk's
    thousands of rows)."""
    d = key.shape[-1]
    hi = lo + index.seq_rows[b]
    own = [_as_ring_holds(t[lo:hi], ring) for t in (key, value)]
    first = index.first_rows[b]
    if not first.ring_reads:
        return own[0], own[1]
    slots = (first.start + torch.arange(first.ring_reads, device=ring.device)) % ring.shape[2]
    stored = ring[first.ring, :, slots].transpose(0, 1).to(key.dtype)
    return torch.cat([stored[..., :d], own[0]]), torch.cat([stored[..., d:], own[1]])


def exact_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    window: int,
    scale: float,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row over its exact keys: key, value [T, Hk, d] the step's, ring [num_rings, Hk, R,
    2d], index the step's (ExactIndex); query [T', Hq, d] the step's rows `rows` (int64 [T'],
    all where None). Returns (out [T', Hq, d], lse [T', Hq]) in float32."""
    n, hq, d = query.shape
    hk = key.shape[1]
    device = query.device
    steps = torch.arange(window, device=device)
    rows = torch.arange(n, device=device) if rows is None else rows
    q = query.float().view(n, hk, 1, hq // hk, d)
    own = _as_ring_holds(torch.cat([key, value], -1), ring)
    out = torch.empty(n, hk, hq // hk, d, device=device)
    lse = torch.empty(n, hk, hq // hk, device=device)
    # Products and sums, not einsum: a batched matmul's rounding depends on how many rows it
    # gets (the BLAS picks kernels by shape), and a row's result must not depend on which rows
    # share its step, so that speculative verify steps and chunking reproduce decoding bit for
    # bit. Blocks of rows bound the [rows, Hk, G, W, d] products (also 2x faster than einsum
    # at 2,048 rows, W 32).
    for lo in range(0, n, EXACT_ROWS):
        hi = min(lo + EXACT_ROWS, n)
        r = rows[lo:hi, None]
        visible = index.visible[r]
        # Entry w of a row: ring slot (s(p) + w) mod R below ring_reads, else own row
        # r - visible + 1 + w (clamped where that row is not read: ring entries, and those
        # hidden past the row's position).
        slots = (index.segment_starts[r].long() + steps) % ring.shape[2]
        stored = ring[index.row_ring[r], :, slots].to(key.dtype)  # [r, W, Hk, 2d]
        own_rows = (r - visible + 1 + steps).clamp(0, len(key) - 1)
        from_ring = (steps < index.ring_reads[r])[..., None, None]
        kv = torch.where(from_ring, stored, own[own_rows]).transpose(1, 2).float()
        kv = kv[:, :, None]  # [r, Hk, 1, W, 2d]
        scores = (q[lo:hi].transpose(2, 3) * kv[..., :d]).sum(-1) * scale  # [r, Hk, G, W]
        hidden = steps[None, :] >= visible  # past the row's own position
        scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
        lse[lo:hi] = scores.logsumexp(-1)
        weights = (scores - lse[lo:hi, ..., None]).exp()
        out[lo:hi] = (weights[..., None] * kv[..., d:]).sum(-2)
    return out.reshape(n, hq, d), lse.reshape(n, hq)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Attention over two disjoint sets of tokens, from each one's output and log-sum-exp
    ([T, Hq, d], [T, Hq]); lse_b is finite (every row reads its own token exactly)."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = (lse_a - top).exp(), (lse_b - top).exp()
    return (out_a.float() * wa[..., None] + out_b * wb[..., None]) / (wa + wb)[..., None]


def exact_merge_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    window: int,
    scale: float,
    rows: torch.Tensor | None,
    compressed: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """Each row's attention over its exact keys (exact_attention's arguments) merged with its
    compressed part (compressed [T', Hq, d], lse [T', Hq] float32, -inf where it read nothing);
    [T', Hq, d] in query's dtype. window/exact.cpp is its fused CPU form."""
    exact, exact_lse = exact_attention(query, key, value, ring, index, window, scale, rows)
    return merge(compressed, lse, exact, exact_lse).to(query.dtype)


def write_ring_reference(
    ring: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: ExactIndex
) -> None:
    """The step's last R tokens per sequence into its ring (after the step has read it),
    rounded to its dtype; window/exact.cpp's write_ring is its CPU form."""
    d = key.shape[-1]
    ring[index.write_blocks, :, index.write_slots, :d] = key[index.write_tokens].to(ring.dtype)
    ring[index.write_blocks, :, index.write_slots, d:] = value[index.write_tokens].to(ring.dtype)
