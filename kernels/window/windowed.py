"""The exact-window rule on any device: the compressed kernels (C++ on the CPU, Triton on CUDA or
in the interpreter, else the PyTorch reference) attend each row over its compressed positions
(< s(p)) as a decode row of that length and return their log-sum-exp, exact.py attends the exact
ones, and the two merge. windowed_step runs a whole step: store, attention, ring write (on the
CPU a decode step is one op: cpu_exact.decode_step). Prefill chunks (sequences with CHUNK_ROWS
rows or more) take a chunk kernel instead: on the CPU one call of vLLM's kernel for the whole
rule (or, with whole_chunk, for the chunk read exactly from its first row's s), as the dense
path runs chunks without the window (dense_window.py); on Triton the context kernel for their
compressed part (a tile of rows shares each record it reads). Same contract as
reference.exact_window_attention_reference."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from tq_vllm.kernels import dispatch
from tq_vllm.kernels.context.cpu_context import DENSE_ROWS, dense_sequences
from tq_vllm.kernels.context.dense import rotated, vllm_cpu_attention
from tq_vllm.kernels.window import cpu_exact
from tq_vllm.kernels.window.dense_window import reads_compressed, rotated_tokens, windowed_prefill
from tq_vllm.kernels.window.exact import ExactIndex, ExactRule, sequence_exact
from tq_vllm.record.codec import LayerCodec

CHUNK_ROWS = DENSE_ROWS  # rows from which a sequence takes a chunk kernel


def windowed_step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
    sparse_v: float = 0.0,
    whole_chunk: bool = False,
) -> None:
    """A step under the exact-window rule, whole: key and value [T, Hk, d] stored as records
    at slot_mapping [T] (-1: padding), windowed_attention's result written to out [T, Hq, d],
    then the ring written."""
    if index.one_row_each and dispatch.cpu_kernel(kv_cache, codec):
        return cpu_exact.decode_step(query, key, value, out, kv_cache, slot_mapping, block_table,
                                     ring, index, codec, scale, rule.window, sparse_v)  # fmt: skip
    dispatch.store_kv(key, value, kv_cache, slot_mapping, codec)
    windowed_attention(query, key, value, kv_cache, block_table, ring, index, codec, scale, rule,
                       sparse_v, whole_chunk, out)  # fmt: skip
    dispatch.write_ring(ring, key, value, index)


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
    sparse_v: float = 0.0,
    whole_chunk: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [T, Hq, d] and the step's key, value [T, Hk, d] (already stored as records),
    block_table [B, max_blocks] of the step's sequences, ring [num_rings, Hk, R, 2d] (read,
    not written), index on query's device. whole_chunk: the rows of a chunk that runs in vLLM's
    CPU kernel read exactly from s(its first row) on (config window_prefill "chunk"). Returns
    [T, Hq, d] in query's dtype: out where given (contiguous), written in place."""
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
    cpu = dispatch.cpu_kernel(kv_cache, codec)
    starts = [0]
    for rows in index.seq_rows:
        starts.append(starts[-1] + rows)
    dense = dense_sequences(query, codec, list(index.seq_rows)) if cpu else []
    if not dense:  # every row fused
        out[:] = _merged(query, key, value, kv_cache, block_table, ring, index, starts, codec,
                         scale, rule, sparse_v)  # fmt: skip
        return out
    fused = torch.ones(query.shape[0], dtype=torch.bool, device=query.device)
    firsts = [index.seq_lens[b] - (starts[b + 1] - starts[b]) for b in range(len(starts) - 1)]
    by_rule = [] if whole_chunk else [
        b for b in dense if reads_compressed(index.seq_lens[b], rule)
    ]  # fmt: skip
    whole = [b for b in dense if b not in by_rule]
    if whole:
        _whole_chunks(query, key, value, kv_cache, block_table, ring, index, codec, scale, whole,
                      starts, out, fused)  # fmt: skip
    for b in by_rule:
        lo, hi, first = starts[b], starts[b + 1], firsts[b]
        exact_k, exact_v = sequence_exact(key, value, ring, index, lo, hi)
        chunk = windowed_prefill(query[lo:hi], exact_k, exact_v, kv_cache, block_table[b], first,
                                 codec, scale, rule)  # fmt: skip
        if chunk is not None:
            out[lo:hi], fused[lo:hi] = chunk, False
    if fused.all():
        out[:] = _merged(query, key, value, kv_cache, block_table, ring, index, starts, codec,
                         scale, rule, sparse_v)  # fmt: skip
    elif fused.any():
        rows = fused.nonzero().flatten()
        out[rows] = _merged(query, key, value, kv_cache, block_table, ring, index, starts, codec,
                            scale, rule, sparse_v, rows)  # fmt: skip
    return out


def _whole_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    codec: LayerCodec,
    scale: float,
    chunks: list[int],
    starts: list[int],
    out: torch.Tensor,
    fused: torch.Tensor,
) -> None:
    """Chunks whose rows all read exactly from s(first row) on (window_prefill "chunk", or a
    chunk that reads no compressed token): each a plain causal attention, a sequence of one
    call of vLLM's kernel. Those with nothing compressed in one call in the model's basis (the
    model dtype's own attention); those that read compressed tokens in another, in the
    rotated basis (dense_window.rotated_tokens). Their rows of out written, of fused cleared,
    where the kernel ran. One call rather than one per chunk through windowed_prefill's pages
    (2.8 ms per 1,000-token prompt and layer; vLLM's whole attention for a step of four took
    8.4 ms; a later chunk 0.93x the time there)."""
    reading = [b for b in chunks if int(index.segment_starts[starts[b]])]
    for group in ([b for b in chunks if b not in reading], reading):
        if not group:
            continue
        rotate = reading is group
        keys, values = [], []
        for b in group:
            lo, hi = starts[b], starts[b + 1]
            k, v = sequence_exact(key, value, ring, index, lo, hi)
            if rotate:  # into the rotated basis, behind the compressed tokens
                k, v = rotated_tokens(kv_cache, block_table[b], int(index.segment_starts[lo]),
                                      k, v, codec, query.dtype)  # fmt: skip
            keys.append(k.transpose(0, 1).to(query.dtype))
            values.append(v.transpose(0, 1).to(query.dtype))
        q_lens = [index.seq_rows[b] for b in group]
        lo, hi = starts[group[0]], starts[group[-1] + 1]
        one_run = hi - lo == sum(q_lens)
        rows = slice(lo, hi) if one_run else torch.cat([torch.arange(starts[b], starts[b + 1])
                                                        for b in group])  # fmt: skip
        # In place: no gather and scatter of 4,000 rows (2.3 ms a layer).
        in_place = one_run and not rotate and out.is_contiguous()
        q = rotated(query[rows], codec) if rotate else query[rows]
        attended = vllm_cpu_attention(q, keys, values, q_lens, scale,
                                      out=out[rows] if in_place else None)  # fmt: skip
        if attended is None:
            continue
        if rotate and not codec.layout.uniform_values:
            attended = rotated(attended, codec, back=True)
        if not in_place:
            out[rows] = attended
        fused[rows] = False


def _merged(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    ring: torch.Tensor,
    index: ExactIndex,
    starts: list[int],
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
    sparse_v: float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (all where None) attended over their compressed positions by the fused kernels and
    over their exact ones, merged by log-sum-exp (dispatch.exact_merge); in query's dtype."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    q = pick(query)
    n, hq, d = q.shape
    lse = torch.empty(n, hq, device=q.device)
    chunks = [b for b, count in enumerate(index.seq_rows) if count >= CHUNK_ROWS]
    if not (rows is None and chunks and dispatch.uses_triton(kv_cache)):  # all decode rows
        compressed = _decode_rows(query, kv_cache, block_table, index, codec, scale, sparse_v,
                                  pick, lse)  # fmt: skip
        return dispatch.exact_merge(q, key, value, ring, index, rule.window, scale, rows,
                                    compressed, lse)  # fmt: skip
    # Triton: the chunks' compressed part in the context kernel, the other rows as decode rows.
    picked = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in chunks]).to(q.device)
    counts = [index.seq_rows[b] for b in chunks]
    qsl = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=q.device)
    lens = torch.tensor([index.seq_lens[b] for b in chunks], dtype=torch.int32, device=q.device)
    compressed = torch.empty(n, hq, d, device=q.device)
    chunk_lse = torch.empty(len(picked), hq, device=q.device)
    compressed[picked] = dispatch.windowed_context_attention(
        q[picked].float(), kv_cache, block_table[chunks], qsl, lens, codec, scale, rule,
        max(counts), sparse_v, chunk_lse,
    )  # fmt: skip
    lse[picked] = chunk_lse
    decode = torch.ones(n, dtype=torch.bool, device=q.device)
    decode[picked] = False
    if decode.any():
        left = decode.nonzero().flatten()
        left_lse = torch.empty(len(left), hq, device=q.device)
        out = _decode_rows(query, kv_cache, block_table, index, codec, scale, sparse_v,
                           lambda t: t[left], left_lse)  # fmt: skip
        compressed[left], lse[left] = out, left_lse
    return dispatch.exact_merge(
        q, key, value, ring, index, rule.window, scale, rows, compressed, lse
    )


def _decode_rows(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    index: ExactIndex,
    codec: LayerCodec,
    scale: float,
    sparse_v: float,
    part: Callable[[torch.Tensor], torch.Tensor],
    lse: torch.Tensor,
) -> torch.Tensor:
    """The rows `part` picks (of the step's rows) over their compressed positions as decode
    rows of length s(p), in float32 (they are merged next); lse gets their log-sum-exps."""
    # On the CPU a bf16 query takes the C++ op's bf16 dots; Triton gets float32 rows.
    q = part(query) if query.device.type == "cpu" else part(query).float()
    # A decode step's rows, all picked, need no gather of table rows.
    rows = q.shape[0]
    whole_step = rows == query.shape[0] and index.one_row_each
    tables = block_table[:rows] if whole_step else block_table[part(index.row_seq)]
    return dispatch.decode_attention(
        q, kv_cache, tables, part(index.segment_starts), codec, scale,
        index.longest_segment_start, sparse_v, lse_out=lse, out_dtype=torch.float32,
    )  # fmt: skip
