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
    by_rule = [] if whole_chunk else [
        b for b in dense if reads_compressed(index.seq_lens[b], rule)
    ]  # fmt: skip
    whole = [b for b in dense if b not in by_rule]
    # Sequences whose rows vLLM's kernel served; the rest take the fused kernels.
    served = _whole_chunks(query, key, value, kv_cache, block_table, ring, index, codec, scale,
                           whole, starts, out) if whole else []  # fmt: skip
    for b in by_rule:
        lo, hi = starts[b], starts[b + 1]
        exact_k, exact_v = sequence_exact(key, value, ring, index, b, lo)
        first = index.seq_lens[b] - (hi - lo)
        chunk = windowed_prefill(query[lo:hi], exact_k, exact_v, kv_cache, block_table[b], first,
                                 codec, scale, rule)  # fmt: skip
        if chunk is not None:
            out[lo:hi] = chunk
            served.append(b)
    if not served:
        out[:] = _merged(query, key, value, kv_cache, block_table, ring, index, starts, codec,
                         scale, rule, sparse_v)  # fmt: skip
        return out
    rest = [b for b, rows in enumerate(index.seq_rows) if rows and b not in served]
    if rest:
        # Host bookkeeping, and a slice where the rows are one run (a mixed step's decode rows
        # lead it): a mask, its tests and a gather and scatter cost 0.5 ms of a served layer.
        span = _rows_of(rest, starts, query.device)
        out[span] = _merged(query, key, value, kv_cache, block_table, ring, index, starts, codec,
                            scale, rule, sparse_v, span)  # fmt: skip
    return out


def _rows_of(seqs: list[int], starts: list[int], device: torch.device) -> slice | torch.Tensor:
    """The step's rows of sequences seqs (ascending): a slice where they are one run, else an
    index tensor."""
    lo, hi = starts[seqs[0]], starts[seqs[-1] + 1]
    if hi - lo == sum(starts[b + 1] - starts[b] for b in seqs):
        return slice(lo, hi)
    return torch.cat([torch.arange(starts[b], starts[b + 1]) for b in seqs]).to(device)


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
) -> list[int]:
    """Chunks whose rows all read exactly from s(first row) on (window_prefill "chunk", or a
    chunk that reads no compressed token): each a plain causal attention, a sequence of one
    call of vLLM's kernel. Those with nothing compressed in one call in the model's basis (the
    model dtype's own attention); those that read compressed tokens in another, in the
    rotated basis (dense_window.rotated_tokens). Their rows of out written where the kernel
    ran; returns those chunks. One call rather than one per chunk through windowed_prefill's pages
    (2.8 ms per 1,000-token prompt and layer; vLLM's whole attention for a step of four took
    8.4 ms; a later chunk 0.93x the time there)."""
    reading = [b for b in chunks if index.first_rows[b].start]
    served = []
    for group in ([b for b in chunks if b not in reading], reading):
        if not group:
            continue
        rotate = reading is group
        keys, values = [], []
        for b in group:
            k, v = sequence_exact(key, value, ring, index, b, starts[b])
            if rotate:  # into the rotated basis, behind the compressed tokens
                k, v = rotated_tokens(kv_cache, block_table[b], index.first_rows[b].start,
                                      k, v, codec, query.dtype)  # fmt: skip
            keys.append(k.transpose(0, 1).to(query.dtype))
            values.append(v.transpose(0, 1).to(query.dtype))
        q_lens = [index.seq_rows[b] for b in group]
        rows = _rows_of(group, starts, query.device)
        # In place: no gather and scatter of 4,000 rows (2.3 ms a layer).
        in_place = isinstance(rows, slice) and not rotate and out.is_contiguous()
        q = rotated(query[rows], codec) if rotate else query[rows]
        attended = vllm_cpu_attention(q, keys, values, q_lens, scale,
                                      out=out[rows] if in_place else None)  # fmt: skip
        if attended is None:
            continue
        if rotate and not codec.layout.uniform_values:
            attended = rotated(attended, codec, back=True)
        if not in_place:
            out[rows] = attended
        served += group
    return served


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
    rows: slice | torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (a slice or an index; all where None) attended over their compressed positions by
    the fused kernels and over their exact ones, merged by log-sum-exp (dispatch.exact_merge);
    in query's dtype."""
    q = query if rows is None else query[rows]
    n, hq, d = q.shape
    lse = torch.empty(n, hq, device=q.device)
    chunks = [b for b, count in enumerate(index.seq_rows) if count >= CHUNK_ROWS]
    if not (rows is None and chunks and dispatch.uses_triton(kv_cache)):  # all decode rows
        compressed = _decode_rows(query, kv_cache, block_table, index, codec, scale, sparse_v,
                                  rows, lse)  # fmt: skip
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=q.device)
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
        out = _decode_rows(query, kv_cache, block_table, index, codec, scale, sparse_v, left,
                           left_lse)  # fmt: skip
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
    rows: slice | torch.Tensor | None,
    lse: torch.Tensor,
) -> torch.Tensor:
    """The step's rows `rows` (a slice or an index; all where None) over their compressed
    positions as decode rows of length s(p), in float32 (they are merged next); lse gets their
    log-sum-exps."""
    span = slice(0, query.shape[0]) if rows is None else rows
    q = query[span]
    if query.device.type != "cpu":  # on the CPU a bf16 query takes the C++ op's bf16 dots
        q = q.float()
    # Rows 0 .. n - 1 that are sequences 0 .. n - 1's only rows (a decode step's, a mixed
    # step's leading decodes) need no gather of table rows.
    leading = isinstance(span, slice) and span.start == 0 and (
        index.one_row_each if rows is None else index.seq_rows[: span.stop].count(1) == span.stop
    )  # fmt: skip
    tables = block_table[: q.shape[0]] if leading else block_table[index.row_seq[span]]
    return dispatch.decode_attention(
        q, kv_cache, tables, index.segment_starts[span], codec, scale,
        index.longest_segment_start, sparse_v, lse_out=lse, out_dtype=torch.float32,
    )  # fmt: skip
