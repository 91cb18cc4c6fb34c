"""Argument checks and per-codec host state shared by the kernel wrappers (Triton and C++).

Nothing here imports Triton: the CPU path must load on machines without it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from tq_vllm.quant.quantizer import TurboQuantizer
from tq_vllm.record.codec import LayerCodec

TRITON_HEAD_DIMS = (64, 128, 256)  # head dims the Triton kernels are built and tested for
# Where the Triton decode kernel looks up centroids: "memory" (gathers from an L1-resident
# table) or "registers" (byte permutes, kernels/register_codebook.py). The served path takes
# TQ_VLLM_CODEBOOK (kernels/dispatch.py); "memory" stays the default until a GPU measurement
# shows "registers" faster.
CODEBOOKS = ("memory", "registers")


def check_kernel_head_dim(head_dim: int) -> None:
    if head_dim not in TRITON_HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} not supported by the Triton kernels (supported: "
            f"{TRITON_HEAD_DIMS}); use the PyTorch reference path"
        )


def check_tensor(
    name: str,
    t: object,
    dim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the kv_cache's device)")
    return t


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LN2 = math.log(2.0)  # the Triton kernels' log-sum-exps are base 2 (exp2 softmax)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_lse_out(lse_out: torch.Tensor | None, query: torch.Tensor) -> None:
    """An attention's optional log-sum-exp output: float32 [T, Hq] beside query [T, Hq, d]."""
    if lse_out is None:
        return
    check_tensor("lse_out", lse_out, 2, (torch.float32,), query.device)
    if lse_out.shape != query.shape[:2] or not lse_out.is_contiguous():
        raise ValueError(
            f"lse_out must be contiguous {list(query.shape[:2])}, got {list(lse_out.shape)}"
        )


_PER_CODEC: dict[tuple[int, str], tuple[weakref.ref, Any]] = {}


def per_codec(codec: LayerCodec, name: str, build: Callable[[LayerCodec], Any]) -> Any:
    """build(codec), computed once per live codec and name. A codec's tensors never change and
    it lives as long as the engine, so what the kernel wrappers derive from it (validation,
    constexprs, lookup tables) need not cost host time on every call of every layer."""
    key = (id(codec), name)
    entry = _PER_CODEC.get(key)
    if entry is None or entry[0]() is not codec:
        value = build(codec)
        _PER_CODEC[key] = (weakref.ref(codec, lambda _: _PER_CODEC.pop(key, None)), value)
        return value
    return entry[1]


def _codec_device(codec: LayerCodec) -> torch.device:
    check_kernel_head_dim(codec.head_dim)
    tensors = codec_tensors(codec)
    device = codec.rotation.device
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"codec {name} is on {t.device}, its rotation on {device}")
    return device


def check_records(kv_cache: object, codec: LayerCodec, uniform_ok: bool = False) -> None:
    """kv_cache uint8 [num_blocks, num_kv_heads, block_size, record_bytes] (each record's bytes
    contiguous), with records the calling kernel can read: uniform_ok, it reads value_mode
    'uniform' records too (the CPU context path, which dequantizes them)."""
    if codec.layout.uniform_values and not uniform_ok:
        raise ValueError(
            "value_mode 'uniform' records cannot be read by this kernel; dispatch.py routes "
            "them to one that can (the CPU path or the PyTorch reference)"
        )
    check_tensor("kv_cache", kv_cache, 4, (torch.uint8,))
    # vLLM may hand a layer a strided view of a buffer shared with layers of another page size
    # (hybrid models): the kernels take any block and head strides, only a record's own bytes
    # must be contiguous.
    if kv_cache.stride(3) != 1 or kv_cache.stride(2) < kv_cache.shape[3]:
        raise ValueError(
            "kv_cache [num_blocks, num_kv_heads, block_size, C] must keep each record's bytes "
            f"contiguous; got strides {kv_cache.stride()}"
        )
    if kv_cache.shape[3] < codec.layout.size:
        raise ValueError(
            f"kv_cache records have {kv_cache.shape[3]} bytes; the codec's layout needs "
            f"{codec.layout.size}"
        )


def check_store_inputs(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    """key, value [T, Hk, d] and slot_mapping [T] on kv_cache's device, matching the codec."""
    device = kv_cache.device
    check_tensor("key", key, 3, FLOAT_DTYPES, device)
    check_tensor("value", value, 3, FLOAT_DTYPES, device)
    check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES, device)
    num_tokens, num_heads, head_dim = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
    if head_dim != codec.head_dim or num_heads != kv_cache.shape[1]:
        raise ValueError(
            f"key is [T, {num_heads}, {head_dim}]; kv_cache has {kv_cache.shape[1]} KV heads "
            f"and the codec head_dim {codec.head_dim}"
        )
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {num_tokens} tokens")


def check_cache(kv_cache: object, codec: LayerCodec) -> torch.Tensor:
    """check_records, and the codec's tensors where the Triton kernels need them."""
    check_records(kv_cache, codec)
    device = per_codec(codec, "device", _codec_device)
    if device != kv_cache.device:
        raise ValueError(f"the codec's tensors are on {device}, kv_cache on {kv_cache.device}")
    return kv_cache


def codec_tensors(codec: LayerCodec) -> dict[str, torch.Tensor]:
    key = codec.key
    parts = {"key": key} if isinstance(key, TurboQuantizer) else {
        "key regular": key.regular, "key outlier": key.outlier
    }  # fmt: skip
    tensors = {"rotation": codec.rotation}
    for name, quantizer in (*parts.items(), ("value", codec.value)):
        tensors[f"{name} centroids"] = quantizer.centroids
        tensors[f"{name} boundaries"] = quantizer.boundaries
    if codec.layout.prod:
        tensors["key qjl"] = key.qjl
    if codec.layout.split_keys:
        tensors["key rotations"] = key.rotation
    return tensors


def check_gqa(query: torch.Tensor, kv_cache: torch.Tensor, codec: LayerCodec) -> int:
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[1]
    if head_dim != codec.head_dim:
        raise ValueError(f"query head_dim {head_dim} != the codec's {codec.head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"query has {num_q_heads} heads, not a multiple of kv_cache's {num_kv_heads} KV heads"
        )
    return num_q_heads // num_kv_heads
