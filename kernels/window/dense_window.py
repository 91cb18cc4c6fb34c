"""A prefill chunk under the exact-window rule on the CPU, in one call of vLLM's CPU attention
kernel (the kernel the model dtype's own prefill runs).

A row at position p sees the compressed tokens before s(p) (ExactRule.start) and the exact
ones from s(p) to p. For rows that share s (a G-aligned group, or neighbouring groups reaching
back to the same anchor) that is plain causal attention over a virtual sequence: compressed
tokens 0 .. s - 1, then exact tokens s .. (the rows are its last positions). Each such run of
the chunk's rows becomes a sequence of one varlen call. They share the whole compressed
pages, dequantized once (dense.dequantized); each has private pages from its last partial
compressed page on, holding compressed tokens up to s and then its exact ones (rotated into the
compressed tokens' basis and rounded to the query's dtype, as the dense path rounds the
compressed ones). Chunks that read no compressed token (a prompt's first chunk) stay in the
model's basis, all of a step's in one call (windowed.windowed_attention): no rotations in or
out, the model dtype's own attention. Pages are PAGE tokens, the smallest the kernel's AMX path
takes: a run's private part is then at most PAGE - G compressed tokens and W exact ones, where
128-token pages copied up to 127 + W per run.

With the config's window_prefill "chunk" (the default) every row of a chunk reads exactly from
s(first row) on: a plain causal attention over the compressed tokens before s(first) and the
exact ones after. Those chunks are no runs: windowed.windowed_attention gives them, all of a
step's, to one call of vLLM's kernel over 128-token blocks (rotated_tokens), those that read a
compressed token in its rotated basis. By the rule, instead, a 2,048-row chunk at W 32 is 256
runs of 8 rows, each re-reading its whole context in vLLM's kernel (in the throughput workload
its calls took 13.7-15.2 s, against 10.0-11.0 s with one run per chunk, and the runs' pages
besides).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tq_vllm.kernels.context.dense import (
    PagedDenseCache,
    _cpu_attention_isa,
    dequantized,
    paged_dense_attention,
    rotated,
    with_vllm_ops,
)
from tq_vllm.kernels.window.exact import ExactRule
from tq_vllm.record.codec import LayerCodec

PAGE = 32  # tokens per page of the temporary cache: a multiple of 32, as the AMX path needs


def windowed_prefill(
    query: torch.Tensor,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    kv_cache: torch.Tensor,
    blocks: torch.Tensor,
    first: int,
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
) -> torch.Tensor | None:
    """query [T, Hq, d]: one sequence's rows at positions first .. first + T - 1; exact_k,
    exact_v [first + T - s(first), Hk, d]: the exact keys and values of positions s(first) ..
    first + T - 1, model basis; blocks: the sequence's block-table row (its records before its last
    row's s are read). Returns [T, Hq, d] in query's dtype, or None where vLLM's kernel cannot
    run. A chunk that reads no compressed token is windowed_attention's to send to vLLM's
    kernel directly (a ValueError here)."""
    n, hq, d = query.shape
    isa = _cpu_attention_isa(query.dtype, d)
    if isa is None or n == 0:
        return None
    dtype = query.dtype
    pages = _virtual_pages(first, first + n, rule)
    s_last = pages.compressed
    # Source rows: compressed positions 0 .. s_last - 1, then exact s(first) .. first + n - 1.
    if not s_last:
        raise ValueError("a chunk that reads no compressed token takes vLLM's kernel directly")
    source_k, source_v = rotated_tokens(kv_cache, blocks, s_last, exact_k, exact_v, codec, dtype)
    q = rotated(query, codec)

    def attend() -> torch.Tensor:
        import vllm._custom_ops as ops

        # Every slot of every page is written (pads repeat a run's last row): the kernel reads
        # whole pages, and garbage past a sequence's end (NaN bit patterns) would reach the
        # output through 0-weight products.
        cache = torch.empty(pages.count, kv_cache.shape[1], 2 * PAGE, d, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        shared = pages.shared * PAGE  # whole compressed pages: slot = position = source row
        parts = (
            (source_k[:shared], source_v[:shared], torch.arange(shared)),
            (source_k[pages.rows], source_v[pages.rows], pages.slots),
        )
        for k, v, slots in parts:
            ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        paged = PagedDenseCache(key_cache, value_cache, pages.table, pages.seq_lens, isa)
        return paged_dense_attention(q.contiguous(), paged, list(pages.q_lens), scale)

    out = with_vllm_ops(attend)
    if out is None or codec.layout.uniform_values:
        return out
    return rotated(out, codec, back=True)  # out in query's dtype


def reads_compressed(end: int, rule: ExactRule) -> bool:
    """Whether a chunk that ends at position end - 1 reads a compressed token by the rule (its
    last row reads the most)."""
    return rule.start(end - 1) > 0


def rotated_tokens(
    kv_cache: torch.Tensor,
    blocks: torch.Tensor,
    compressed: int,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    codec: LayerCodec,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's keys and values [compressed + L, Hk, d] in dtype and the compressed
    tokens' basis (keys and Lloyd-Max values rotated, uniform values the model's): its first
    `compressed` tokens dequantized from the records (blocks: its block-table row), then
    exact_k, exact_v [L, Hk, d] rotated into it. Keys stay rotated because rounded to bf16 in
    the model's basis, where a few channels carry most of a key, they cost perplexity (README,
    Quality: the default +0.41% -> +0.52%)."""
    keys, values = dequantized(kv_cache, blocks, compressed, codec, dtype)
    exact_k, exact_v = rotated(exact_k.to(dtype), codec), exact_v.to(dtype)
    if not codec.layout.uniform_values:
        exact_v = rotated(exact_v, codec, values=True)
    return torch.cat([keys.transpose(0, 1), exact_k]), torch.cat([values.transpose(0, 1), exact_v])


@dataclass(frozen=True)  # cached and shared by a step's layers: read only
class VirtualPages:
    """The chunk's runs as sequences of one varlen call over a temporary paged cache: pages
    0 .. shared - 1 hold compressed positions 0 .. shared * PAGE - 1 (read by every run that
    reaches them), then each run's private pages in run order."""

    compressed: int  # s_last: compressed positions 0 .. s_last - 1 are read
    count: int  # pages in all
    shared: int
    rows: torch.Tensor  # int64: the source row of each private slot, in slot order
    slots: torch.Tensor  # int64: shared * PAGE .. count * PAGE - 1
    table: torch.Tensor  # int32 [runs, pages]: each run's pages
    seq_lens: torch.Tensor  # int32 [runs]: a run's virtual length, its last row's position + 1
    q_lens: tuple[int, ...]  # each run's rows


@functools.lru_cache(maxsize=64)
def _virtual_pages(first: int, end: int, rule: ExactRule) -> VirtualPages:
    """Positions first .. end - 1 in runs sharing s = start(p), constant over each g-aligned
    group (the rule's groups; neighbours with the same s joined). Source rows: compressed
    positions 0 .. s_last - 1, then exact positions s(first) .. end - 1. Cached (its tensors are
    only read): every layer of a step asks for the same chunk's pages, 0.2-0.6 ms of small
    tensor ops each time."""
    g, s_first, start = rule.grain, rule.start(first), rule.start
    s_last = start(end - 1)
    lo = torch.cat([torch.tensor([first]), torch.arange(first // g * g + g, end, g)])
    stop = (lo // g * g + g).clamp(max=end)
    s, groups = torch.unique_consecutive(start(lo), return_counts=True)
    last = groups.cumsum(0) - 1
    lo, stop = lo[last - groups + 1], stop[last]
    own = s // PAGE  # whole compressed pages a run reads from the shared ones
    private = (stop - own * PAGE + PAGE - 1) // PAGE
    shared = s_last // PAGE
    # Private slot k of run r holds position own[r] * PAGE + k: compressed below s, exact up
    # to the run's last row, then that row again (a pad, past the run's length).
    slots_each = private * PAGE
    run = torch.repeat_interleave(torch.arange(len(s)), slots_each)
    k = torch.arange(int(slots_each.sum())) - torch.repeat_interleave(
        slots_each.cumsum(0) - slots_each, slots_each
    )
    pos = own[run] * PAGE + k
    exact_row = s_last - s_first + torch.minimum(pos, stop[run] - 1)
    rows = torch.where(pos < s[run], pos, exact_row)
    page0 = shared + private.cumsum(0) - private
    col = torch.arange(int((own + private).max()))[None]
    table = torch.where(col < own[:, None], col, page0[:, None] + col - own[:, None])
    table = table.masked_fill(col >= (own + private)[:, None], 0).to(torch.int32)
    return VirtualPages(
        compressed=s_last,
        count=shared + int(private.sum()),
        shared=shared,
        rows=rows,
        slots=shared * PAGE + torch.arange(len(rows)),
        table=table,
        seq_lens=stop.to(torch.int32),
        q_lens=tuple((stop - lo).tolist()),
    )
