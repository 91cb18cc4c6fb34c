"""Temporal tiers: each query reads its own W-aligned segment exactly, older tokens compressed.

The rule is a function of positions only, so chunked prefill, prefix-cache hits, preemption and
speculative verify steps give the same result as one long prefill: a query at position p reads
positions s(p) = floor(p / W) * W .. p from the model-dtype keys and values, and positions
< s(p) from the compressed records (which every token still gets).

Where the exact tokens live: a ring of R >= W slots per request and layer, position t at slot
t mod R, K and V side by side ([num_rings, Hk, R, 2d], the model dtype, or bf16 where a float32
ring would outgrow a block of records: plugin/exact_ring.py). A step reads the ring
for the tokens of its first segment that earlier steps stored, attends, then writes its own
last R tokens (so a long chunk never overwrites what it still reads). R = W + the speculative
lookahead keeps a rejected draft from overwriting a slot that a later query reads.

How one step attends: the compressed kernels attend each row over positions < s(p) and return
their log-sum-exp (-inf where s(p) = 0); each row then attends over its at most W exact keys
(the ring's, then the step's own) and the two merge by their log-sum-exps: exact_merge_reference
here, window/exact.cpp on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class ExactIndex:
    """Where one step's exact keys come from, built once per step (host tensors, shared by
    every layer). The step's exact timeline concatenates, per sequence, the ring's tokens of
    its first segment (positions s(chunk start) .. chunk start - 1) and the step's own tokens;
    row r reads W entries from window_start[r], of which the first visible[r] are its keys."""

    row_seq: torch.Tensor  # int64 [T]: each row's sequence
    segment_starts: torch.Tensor  # int32 [T]: s(p) per row, where its exact keys begin
    window_start: torch.Tensor  # int64 [T]: timeline index of position s(p)
    visible: torch.Tensor  # int64 [T]: p - s(p) + 1
    timeline_len: int
    ring_entries: torch.Tensor  # int64 [E]: timeline indices filled from the ring
    ring_blocks: torch.Tensor  # int64 [E]: their ring
    ring_slots: torch.Tensor  # int64 [E]: their slot
    own_entries: torch.Tensor  # int64 [T]: timeline index of each of the step's tokens
    write_tokens: torch.Tensor  # int64 [N]: the step's tokens written to the ring afterwards
    write_blocks: torch.Tensor  # int64 [N]
    write_slots: torch.Tensor  # int64 [N]
    longest_segment_start: int  # max s(p): sizes the Triton decode's splits
    seq_rows: tuple[int, ...]  # host: each sequence's rows this step
    seq_lens: tuple[int, ...]  # host: each sequence's length after this step

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
    window: int,
    ring_size: int,
) -> ExactIndex:
    """query_start_loc [B + 1] and seq_lens [B] as vLLM gives them (host tensors), rings [B]:
    each sequence's ring; window W and ring size R >= W."""
    if ring_size < window:
        raise ValueError(f"a ring of {ring_size} slots cannot hold a {window}-token window")
    starts = query_start_loc.long()
    q_lens = starts[1:] - starts[:-1]
    lens = seq_lens.long()
    chunk = lens - q_lens  # each sequence's first position this step
    base = chunk // window * window  # its first segment's start
    from_ring = chunk - base  # tokens of that segment stored by earlier steps
    per_seq = from_ring + q_lens
    offsets = torch.cumsum(per_seq, 0) - per_seq  # each sequence's timeline start
    seq = torch.repeat_interleave(torch.arange(len(lens)), q_lens)
    row = torch.arange(int(q_lens.sum())) - starts[seq]  # row within its sequence
    positions = chunk[seq] + row
    segment = positions // window * window
    own_entries = offsets[seq] + from_ring[seq] + row
    ring_seq = torch.repeat_interleave(torch.arange(len(lens)), from_ring)
    ring_pos = base[ring_seq] + _ranks(from_ring)
    written = torch.minimum(q_lens, torch.full_like(q_lens, ring_size))
    write_seq = torch.repeat_interleave(torch.arange(len(lens)), written)
    write_pos = lens[write_seq] - written[write_seq] + _ranks(written)
    return ExactIndex(
        row_seq=seq,
        segment_starts=segment.to(torch.int32),
        window_start=offsets[seq] + segment - base[seq],
        visible=positions - segment + 1,
        timeline_len=int(per_seq.sum()),
        ring_entries=offsets[ring_seq] + ring_pos - base[ring_seq],
        ring_blocks=rings.long()[ring_seq],
        ring_slots=ring_pos % ring_size,
        own_entries=own_entries,
        write_tokens=starts[write_seq] + write_pos - chunk[write_seq],
        write_blocks=rings.long()[write_seq],
        write_slots=write_pos % ring_size,
        longest_segment_start=int(segment.max()) if len(segment) else 0,
        seq_rows=tuple(q_lens.tolist()),
        seq_lens=tuple(lens.tolist()),
    )


def _ranks(counts: torch.Tensor) -> torch.Tensor:
    """0 .. counts[i] - 1 for each i, concatenated."""
    total = int(counts.sum())
    firsts = torch.cumsum(counts, 0) - counts
    return torch.arange(total) - torch.repeat_interleave(firsts, counts)


def exact_timeline(
    key: torch.Tensor, value: torch.Tensor, ring: torch.Tensor, index: ExactIndex, window: int
) -> torch.Tensor:
    """The step's exact timeline [timeline_len + W, Hk, 2d] (K then V, key's dtype; zero past
    its end): per sequence the ring's tokens of its first segment, then the step's own, rounded
    to the ring's dtype as the ring holds them (a token reads the same whichever step stored it).
    key, value [T, Hk, d]; ring [num_rings, Hk, R, 2d]."""
    n, hk, d = key.shape
    timeline = torch.zeros(index.timeline_len + window, hk, 2 * d, dtype=key.dtype,
                           device=key.device)  # fmt: skip
    if index.ring_entries.numel():
        timeline[index.ring_entries] = ring[index.ring_blocks, :, index.ring_slots].to(key.dtype)
    timeline[index.own_entries, :, :d] = key[:n].to(ring.dtype).to(key.dtype)
    timeline[index.own_entries, :, d:] = value[:n].to(ring.dtype).to(key.dtype)
    return timeline


def exact_attention(
    query: torch.Tensor,
    timeline: torch.Tensor,
    window_start: torch.Tensor,
    visible: torch.Tensor,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row over its exact keys: query [T, Hq, d], row r reading the first visible[r] of
    the W timeline entries from window_start[r] (ExactIndex's fields for these rows). Returns
    (out [T, Hq, d], lse [T, Hq]) in float32."""
    n, hq, d = query.shape
    hk = timeline.shape[1]
    device = query.device
    steps = torch.arange(window, device=device)
    q = query.float().view(n, hk, 1, hq // hk, d)
    out = torch.empty(n, hk, hq // hk, d, device=device)
    lse = torch.empty(n, hk, hq // hk, device=device)
    # Products and sums, not einsum: a batched matmul's rounding depends on how many rows it
    # gets (the BLAS picks kernels by shape), and a row's result must not depend on which rows
    # share its step, so that speculative verify steps and chunking reproduce decoding bit for
    # bit. Blocks of rows bound the [rows, Hk, G, W, d] products (also 2x faster than einsum
    # at 2,048 rows, W 32).
    for lo in range(0, n, EXACT_ROWS):
        hi = min(lo + EXACT_ROWS, n)
        kv = timeline[window_start[lo:hi, None] + steps].transpose(1, 2).float()  # [r, Hk, W, 2d]
        kv = kv[:, :, None]  # [r, Hk, 1, W, 2d]
        scores = (q[lo:hi].transpose(2, 3) * kv[..., :d]).sum(-1) * scale  # [r, Hk, G, W]
        hidden = steps[None, :] >= visible[lo:hi, None]  # past the row's own position
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
    timeline: torch.Tensor,
    window_start: torch.Tensor,
    visible: torch.Tensor,
    window: int,
    scale: float,
    compressed: torch.Tensor,
    lse: torch.Tensor,
) -> torch.Tensor:
    """Each row's attention over its exact keys (exact_attention's arguments) merged with its
    compressed part (compressed [T, Hq, d], lse [T, Hq] float32, -inf where it read nothing);
    [T, Hq, d] in query's dtype. window/exact.cpp is its fused CPU form."""
    exact, exact_lse = exact_attention(query, timeline, window_start, visible, window, scale)
    return merge(compressed, lse, exact, exact_lse).to(query.dtype)


def write_ring(
    ring: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: ExactIndex
) -> None:
    """The step's last R tokens per sequence into its ring (after the step has read it)."""
    d = key.shape[-1]
    ring[index.write_blocks, :, index.write_slots, :d] = key[index.write_tokens].to(ring.dtype)
    ring[index.write_blocks, :, index.write_slots, d:] = value[index.write_tokens].to(ring.dtype)
