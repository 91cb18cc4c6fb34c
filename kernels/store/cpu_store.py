"""Store through the C++ op (store.cpp): reference.store_kv_reference's records, one row at a
time in C++ (its own rounding: an index can differ at a bucket boundary, a norm by one fp16
ulp) instead of the reference's dozens of small tensor ops."""

from __future__ import annotations

import torch

from tq_vllm.kernels.common import check_records, check_store_inputs, per_codec
from tq_vllm.kernels.cpu_extension import codebooks, layout_fields, ops
from tq_vllm.record.codec import LayerCodec


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    """store_kv_reference, fused (value_mode "uniform" has no fused store)."""
    check_records(kv_cache, codec)
    check_store_inputs(key, value, kv_cache, slot_mapping, codec)
    if slot_mapping.numel() == 0:
        return
    ops().store(key, value, kv_cache, slot_mapping, *store_arguments(codec))


def store_arguments(codec: LayerCodec) -> tuple:
    """store.cpp's arguments after the slot mapping (window/decode_step.cpp ends with them too),
    made once per codec."""
    return per_codec(codec, "cpu store", _arguments)


def _arguments(codec: LayerCodec) -> tuple:
    """Rotations (as R^T, S^T: a row's product is then a sum of their rows), codebooks and the
    layout."""
    layout = codec.layout
    split = layout.split_keys
    plain = codec.key.regular if split else codec.key  # the keys' (regular part's) quantizer
    outlier = codec.key.outlier if split else None

    def transposed(m: torch.Tensor) -> torch.Tensor:
        return m.T.float().contiguous()

    return (
        codebooks(codec).rotation_t,
        codec.value.centroids,
        codec.value.boundaries,
        transposed(plain.rotation),
        plain.centroids,
        plain.boundaries,
        transposed(plain.qjl) if layout.prod else None,
        layout_fields(codec),
        codec.key.order.contiguous() if split else None,
        transposed(outlier.rotation) if split else None,
        outlier.centroids if split else None,
        outlier.boundaries if split else None,
    )
