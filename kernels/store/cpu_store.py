"""Store through the C++ op (store.cpp): the bytes reference.store_kv_reference writes, packed
in C++ without the reference's dozens of small tensor ops."""

from __future__ import annotations

import torch

from tq_vllm.kernels.common import check_records, check_store_inputs, per_codec
from tq_vllm.kernels.cpu_extension import layout_fields, ops
from tq_vllm.record.codec import LayerCodec


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    """store_kv_reference, fused: the same bytes (value_mode "uniform" has no fused store)."""
    check_records(kv_cache, codec)
    check_store_inputs(key, value, kv_cache, slot_mapping, codec)
    if slot_mapping.numel() == 0:
        return
    ops().store(key, value, kv_cache, slot_mapping, *per_codec(codec, "cpu store", _arguments))


def _arguments(codec: LayerCodec) -> tuple:
    """store.cpp's arguments after the slot mapping: rotations, codebooks and the layout."""
    layout = codec.layout
    split = layout.split_keys
    plain = codec.key.regular if split else codec.key  # the keys' (regular part's) quantizer
    outlier = codec.key.outlier if split else None
    return (
        codec.rotation,
        codec.value.centroids,
        codec.value.boundaries,
        plain.rotation,
        plain.centroids,
        plain.boundaries,
        plain.qjl if layout.prod else None,
        layout_fields(codec),
        codec.key.order if split else None,
        outlier.rotation if split else None,
        outlier.centroids if split else None,
        outlier.boundaries if split else None,
    )
