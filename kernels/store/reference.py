"""Store, the contract: quantize a step's new keys and values into the paged cache at
slot_mapping (PyTorch). The Triton kernel (triton_store.py) and the C++ op (store.cpp) write
the same records but where float rounding may differ: an index at a bucket boundary, a norm by
one fp16 ulp (tests/cases.py, assert_records_close).
"""

from __future__ import annotations

import torch

from tq_vllm.record.codec import LayerCodec


def store_kv_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    """Write the records of key/value [T, Hk, d] into kv_cache uint8 [NB, Hk, BS, C].

    Token t goes to block slot_mapping[t] // BS, offset slot_mapping[t] % BS; negative slots
    (vLLM's padding) are skipped. Bytes of a record past the layout's size are left alone.
    """
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if slot_mapping.numel() == 0:
        return
    records = codec.encode(key, value)  # [T, Hk, size or record_bytes]
    size = codec.layout.size
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    # kv_cache[blocks, :, offsets] is [T, Hk, C]: advanced indices around a slice.
    kv_cache[blocks, :, offsets, :size] = records[..., :size]
