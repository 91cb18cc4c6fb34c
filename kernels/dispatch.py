"""Which kernel runs where: Triton on CUDA; on CPU the C++ ops when they build, else the
PyTorch references (same contracts). Triton is imported only on the Triton path.

TQ_VLLM_KERNELS=triton sends CPU tensors to the Triton kernels too, run by Triton's interpreter
(TRITON_INTERPRET=1; startup refuses the switch without it): a served model then drives the
CUDA path's kernels with vLLM's real block tables, slot mappings and chunked-prefill metadata
on a machine without a GPU. TQ_VLLM_KERNELS=reference serves with the PyTorch references (the
float32 contract every kernel is measured against). Both are slow; for tests.

TQ_VLLM_CODEBOOK=registers sends the Triton decode through its register codebook
(common.CODEBOOKS); unset, it gathers from memory.
"""

from __future__ import annotations

import os

import torch

from tq_vllm.kernels import cpu_extension
from tq_vllm.kernels.context import cpu_context
from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.decode import cpu_decode
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.kernels.store import cpu_store
from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.kernels.window import cpu_exact
from tq_vllm.kernels.window.exact import (
    ExactIndex,
    ExactRule,
    exact_merge_reference,
    write_ring_reference,
)
from tq_vllm.record.codec import LayerCodec

KERNELS_ENV = "TQ_VLLM_KERNELS"
KERNEL_CHOICES = ("triton", "reference")
CODEBOOK_ENV = "TQ_VLLM_CODEBOOK"
CODEBOOK = os.environ.get(CODEBOOK_ENV) or "memory"  # startup refuses an unknown one
TRITON_EVERYWHERE = os.environ.get(KERNELS_ENV) == "triton"
REFERENCE_ONLY = os.environ.get(KERNELS_ENV) == "reference"


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels attend for t's device (CUDA, or TQ_VLLM_KERNELS=triton)."""
    return (t.is_cuda or TRITON_EVERYWHERE) and not REFERENCE_ONLY


def _cpu(t: torch.Tensor) -> bool:
    return t.is_cpu and not REFERENCE_ONLY and cpu_extension.available()


def cpu_kernel(t: torch.Tensor, codec: LayerCodec) -> bool:
    # The C++ attention reads Lloyd-Max values only; uniform-value records stay on the reference.
    # TQ_VLLM_KERNELS=triton on a CPU sends everything to the Triton kernels instead.
    return _cpu(t) and not uses_triton(t) and not codec.layout.uniform_values


def attention_kernels(device: torch.device, codec: LayerCodec) -> str:
    """What attends for a layer on this device, in words (the backend logs it)."""
    probe = torch.empty(0, device=device)
    if uses_triton(probe):
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return "the Triton kernels" + (" (interpreted)" if interpreted else "")
    if cpu_kernel(probe, codec):
        return "the C++ kernels"
    return "the PyTorch reference"


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    if uses_triton(kv_cache):
        from tq_vllm.kernels.store.triton_store import store_kv as kernel

        return kernel(key, value, kv_cache, slot_mapping, codec)
    if cpu_kernel(kv_cache, codec):
        return cpu_store.store_kv(key, value, kv_cache, slot_mapping, codec)
    return store_kv_reference(key, value, kv_cache, slot_mapping, codec)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    max_seq_len: int | None = None,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
    lse_out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """max_seq_len: the batch's longest sequence, known on the host (sizes the Triton splits).
    sparse_v: the fused kernels skip value tiles whose weights all lie below sparse_v times
    their row's running maximum (the references read every value).
    sliding_window: a query at position p sees positions p - W < t <= p (None: all).
    lse_out: float32 [B, Hq], written with each row's log-sum-exp (-inf where it read nothing).
    out_dtype: the result's dtype (None: query's). A partial to be merged takes float32: the C++
    op then hands over its float32 sums instead of rounding them to the model dtype first."""
    args = (query, kv_cache, block_table, seq_lens, codec, scale)
    options = dict(sliding_window=sliding_window, lse_out=lse_out)
    if uses_triton(kv_cache):
        from tq_vllm.kernels.decode.triton_decode import decode_attention as kernel

        out = kernel(*args, max_seq_len, sparse_v=sparse_v, codebook=CODEBOOK, **options)
    elif cpu_kernel(kv_cache, codec):
        return cpu_decode.decode_attention(*args, sparse_v=sparse_v, out_dtype=out_dtype, **options)
    else:
        out = decode_attention_reference(*args, **options)
    return out if out_dtype is None else out.to(out_dtype)


def windowed_context_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    rule: ExactRule,
    max_query_len: int,
    sparse_v: float,
    lse_out: torch.Tensor,
) -> torch.Tensor:
    """The compressed part of prefill chunks under the exact-window rule (a row at p reads
    positions < rule.start(p), lse_out gets its log-sum-exp), the chunks already stored, in
    one Triton context kernel call. Triton only (uses_triton): elsewhere the callers attend
    chunk rows as decode rows."""
    from tq_vllm.kernels.context.triton_context import context_attention as kernel

    return kernel(
        query, None, None, kv_cache, block_table, query_start_loc, seq_lens, codec, scale,
        max_query_len=max_query_len, sparse_v=sparse_v, exact_rule=rule, lse_out=lse_out,
    )  # fmt: skip


def context_attention(
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    max_query_len: int | None = None,
    sparse_v: float = 0.0,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """max_query_len: the longest chunk, known on the host (spares the Triton path a sync).
    sparse_v, sliding_window: as in decode_attention."""
    args = (query, key, value, kv_cache, block_table, query_start_loc, seq_lens, codec, scale)
    if uses_triton(kv_cache):
        from tq_vllm.kernels.context.triton_context import context_attention as kernel

        return kernel(
            *args, max_query_len=max_query_len, sparse_v=sparse_v, sliding_window=sliding_window
        )
    # The CPU context path reads uniform values too (dequantized for the dense attention, else
    # the reference).
    if key is None and value is None and _cpu(kv_cache):
        return cpu_context.context_attention(
            query, kv_cache, block_table, query_start_loc, seq_lens, codec, scale,
            sparse_v=sparse_v, sliding_window=sliding_window,
        )  # fmt: skip
    return context_attention_reference(*args, sliding_window)


def exact_merge(
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
    """The exact-window rule's exact part, merged with the compressed one
    (exact.exact_merge_reference's contract): the C++ op on the CPU, PyTorch elsewhere."""
    args = (query, key, value, ring, index, window, scale, rows, compressed, lse)
    if _cpu(query) and not uses_triton(query):
        return cpu_exact.exact_merge(*args)
    return exact_merge_reference(*args)


def write_ring(
    ring: torch.Tensor, key: torch.Tensor, value: torch.Tensor, index: ExactIndex
) -> None:
    """The step's last R tokens per sequence into its ring (exact.write_ring_reference)."""
    if _cpu(ring) and not uses_triton(ring):
        return cpu_exact.write_ring(ring, key, value, index)
    return write_ring_reference(ring, key, value, index)
