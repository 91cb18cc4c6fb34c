"""Device dispatch: Triton kernels on CUDA; on CPU the fused C++ attention kernels
(kernels/cpu_attention.py) when they build, else the PyTorch path (same contracts)."""

from __future__ import annotations

import torch

from tq_vllm.codec import LayerCodec
from tq_vllm.kernels import cpu_attention
from tq_vllm.kernels.attention_reference import (
    context_attention_reference,
    decode_attention_reference,
)
from tq_vllm.kernels.store import store_kv_reference


def _triton(t: torch.Tensor) -> bool:
    return t.is_cuda


def _cpu_kernel(t: torch.Tensor, codec: LayerCodec) -> bool:
    # The C++ attention reads Lloyd-Max values only; uniform-value records stay on the reference.
    return t.device.type == "cpu" and not codec.layout.uniform_values and cpu_attention.available()


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    if _triton(kv_cache):
        from tq_vllm.kernels.store import store_kv as kernel

        return kernel(key, value, kv_cache, slot_mapping, codec)
    if _cpu_kernel(kv_cache, codec) and not codec.layout.split_keys:  # the reference splits keys
        return cpu_attention.store_kv(key, value, kv_cache, slot_mapping, codec)
    return store_kv_reference(key, value, kv_cache, slot_mapping, codec)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
) -> torch.Tensor:
    if _triton(kv_cache):
        from tq_vllm.kernels.decode import decode_attention as kernel

        return kernel(query, kv_cache, block_table, seq_lens, codec, scale)
    if _cpu_kernel(kv_cache, codec):
        return cpu_attention.decode_attention(query, kv_cache, block_table, seq_lens, codec, scale)
    return decode_attention_reference(query, kv_cache, block_table, seq_lens, codec, scale)


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
) -> torch.Tensor:
    args = (query, key, value, kv_cache, block_table, query_start_loc, seq_lens, codec, scale)
    if _triton(kv_cache):
        from tq_vllm.kernels.context import context_attention as kernel

        return kernel(*args)
    # The CPU context path reads uniform values too (dequantized for the dense attention, else
    # the reference).
    cpu = kv_cache.device.type == "cpu" and cpu_attention.available()
    if key is None and value is None and cpu:
        return cpu_attention.context_attention(
            query, kv_cache, block_table, query_start_loc, seq_lens, codec, scale
        )
    return context_attention_reference(*args)
