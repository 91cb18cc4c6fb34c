"""A prefill chunk under the exact-window rule on the CPU, in one call of vLLM's CPU attention
kernel (the kernel the model dtype's own prefill runs).

A row at position p sees the compressed tokens before s(p) (ExactRule.start) and the exact
ones from s(p) to p. For rows that share s (a G-aligned group, or neighbouring groups reaching
back to the same anchor) that is plain causal attention over a virtual sequence: compressed
tokens 0 .. s - 1, then exact tokens s .. (the rows are its last positions). Each such run of
the chunk's rows becomes a sequence of one varlen call. They share
the paged blocks of whole compressed blocks, dequantized once (dense.dequantized); each has
private blocks from its last partial compressed block on, holding compressed tokens up to s
and then its exact ones. The exact keys and values are rotated into the compressed tokens'
basis and rounded to the query's dtype, as the dense path rounds the compressed ones.
"""

from __future__ import annotations

import torch

from tq_vllm.kernels.context.dense import (
    DENSE_BLOCK,
    PagedDenseCache,
    _cpu_attention_isa,
    dequantized,
    paged_dense_attention,
    with_vllm_ops,
)
from tq_vllm.kernels.window.exact import ExactRule
from tq_vllm.record.codec import LayerCodec


def windowed_prefill(
    query: torch.Tensor,
    exact: torch.Tensor,
    kv_cache: torch.Tensor,
    blocks: torch.Tensor,
    first: int,
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
) -> torch.Tensor | None:
    """query [T, Hq, d]: one sequence's rows at positions first .. first + T - 1; exact
    [first + T - s(first), Hk, 2d]: the exact keys then values of positions s(first) .. first +
    T - 1, model basis; blocks: the sequence's block-table row (its records before its last
    row's s are read). Returns [T, Hq, d] in query's dtype, or None where vLLM's kernel
    cannot run."""
    n, hq, d = query.shape
    isa = _cpu_attention_isa(query.dtype, d)
    if isa is None or n == 0:
        return None
    dtype, block = query.dtype, DENSE_BLOCK
    end = first + n
    s_first, s_last = rule.start(first), rule.start(end - 1)
    if s_last:
        keys, values = dequantized(kv_cache, blocks, s_last, codec, dtype)
        keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [s_last, Hk, d]
    else:
        keys = values = exact.new_empty(0, exact.shape[1], d, dtype=dtype)
    exact_keys = codec.rotate_queries(exact[..., :d]).to(dtype)
    exact_values = exact[..., d:]
    if not codec.layout.uniform_values:  # uniform values stay in the model's basis
        exact_values = codec.rotate(exact_values)
    # Source rows: compressed positions 0 .. s_last - 1, then exact s_first .. end - 1.
    source_k = torch.cat([keys, exact_keys])
    source_v = torch.cat([values, exact_values.to(dtype)])
    shared = s_last // block  # whole compressed blocks, slots = positions
    rows, slots, tables, seq_lens, q_lens = [torch.arange(shared * block)], [], [], [], []
    slots.append(rows[0])
    next_block = shared
    for s, lo, stop in _runs(first, end, rule):
        from_block = s // block * block
        compressed = torch.arange(from_block, s)
        exact_rows = s_last + torch.arange(s, stop) - s_first
        count = stop - from_block
        private = -(-count // block)
        rows += [compressed, exact_rows]
        slots.append(next_block * block + torch.arange(count))
        tables.append(list(range(s // block)) + list(range(next_block, next_block + private)))
        next_block += private
        seq_lens.append(stop)
        q_lens.append(stop - lo)
    table = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for i, row in enumerate(tables):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    picked, slot_mapping = torch.cat(rows), torch.cat(slots)

    def attend() -> torch.Tensor:
        import vllm._custom_ops as ops

        # Zeroed: the kernel reads whole blocks (NaN bit patterns past a sequence's end would
        # reach the output through 0-weight products).
        cache = torch.zeros(next_block, kv_cache.shape[1], 2 * block, d, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            source_k[picked], source_v[picked], key_cache, value_cache, slot_mapping, isa
        )
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        paged = PagedDenseCache(key_cache, value_cache, table, lens, isa)
        q = codec.rotate_queries(query).to(dtype).contiguous()
        return paged_dense_attention(q, paged, q_lens, scale)

    out = with_vllm_ops(attend)
    if out is None or codec.layout.uniform_values:
        return out
    return codec.unrotate(out).to(dtype)


def _runs(first: int, end: int, rule: ExactRule) -> list[tuple[int, int, int]]:
    """(s, lo, stop) for each run of positions lo .. stop - 1 in first .. end - 1 sharing
    s = rule.start: the rule's G-aligned groups, neighbours with the same s joined."""
    runs: list[tuple[int, int, int]] = []
    g = rule.grain
    for lo in [first, *range(first // g * g + g, end, g)]:
        s, stop = rule.start(lo), min(end, lo // g * g + g)
        if runs and runs[-1][0] == s:
            runs[-1] = (s, runs[-1][1], stop)
        else:
            runs.append((s, lo, stop))
    return runs
