"""The per-token, per-KV-head record stored in vLLM's paged blocks. The byte layout lives here.

vLLM gives each layer a uint8 tensor [num_blocks, num_kv_heads, block_size, record_bytes]. One
record, byte offsets from its start (all fields little-endian, no alignment needed):

    0                      key norm, float16 (split keys: the regular channels' norm)
    2                      key residual norm, float16              (prod mode only)
                           or the outlier channels' norm, float16  (split keys only)
    value_norm             value norm, float16 (value_mode "uniform": the value scale)
    value_zero             value zero point, float16               (value_mode "uniform" only)
    key_indices            key indices, ceil(d * key_index_bits / 8) bytes, packed (packing.py);
                           split keys: the d - n regular channels' indices at key_bits, then
                           (key_outlier_indices) the n outlier channels' at key_outlier_bits
    key_signs              QJL sign bits of the key residual, ceil(d / 8) bytes (prod mode only)
    value_indices          value indices, ceil(d * value_bits / 8) bytes, packed
    size                   end of the used bytes. Served records are exactly this long; a
                           record padded up to `padded_size` keeps the kernels honest about
                           reading the record pitch from the cache, not from the layout

Norms come first so that a kernel finds them at fixed offsets whatever the bit widths are.
value_mode "uniform" (quant/uniform.py: upstream vLLM's value format, for comparison) is read
by the PyTorch path only; kernels check `RecordLayout.uniform_values` and must not read such
records. Split keys (key_outliers > 0, quant/outliers.py: n outlier channels per head at more
bits) are read by the PyTorch path and the CPU paths (fused attention, C++ dequantize) only,
likewise checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from tq_vllm.quant.outliers import SplitCodes
from tq_vllm.quant.quantizer import TurboCodes
from tq_vllm.quant.uniform import UniformCodes
from tq_vllm.record.packing import packed_bytes

VALUE_MODES = ("mse", "uniform")
# What a kernel needs to read or write a record: bit widths, flags and every byte offset.
KERNEL_FIELDS = (
    "key_index_bits",
    "prod",
    "value_bits",
    "key_norm",
    "key_residual_norm",
    "value_norm",
    "value_zero",
    "key_indices",
    "key_signs",
    "value_indices",
    "key_outliers",
    "key_outlier_bits",
    "key_outlier_norm",
    "key_outlier_indices",
    "uniform_values",
)


# Derived offsets are cached_property: the kernel wrappers check them on every call of every
# layer, and each walks a chain of the others (the fields are frozen, so they cannot go stale).
@dataclass(frozen=True)
class RecordLayout:
    head_dim: int
    key_bits: int
    key_mode: str
    value_bits: int
    padded_size: int = 0  # 0: no padding
    value_mode: str = "mse"  # "uniform": fp16 scale + zero point, no rotation (quant/uniform.py)
    key_outliers: int = 0  # n outlier channels per key (quant/outliers.py); 0: plain keys
    key_outlier_bits: int = 0  # their bits

    def __post_init__(self) -> None:
        if self.value_mode not in VALUE_MODES:
            raise ValueError(f"value_mode must be one of {VALUE_MODES}, got {self.value_mode!r}")
        if self.split_keys and self.prod:
            raise ValueError("outlier channels need key_mode 'mse' (prod keys cannot be split)")

    @cached_property
    def split_keys(self) -> bool:
        return self.key_outliers > 0

    @cached_property
    def key_regular_channels(self) -> int:
        return self.head_dim - self.key_outliers

    @cached_property
    def key_rate(self) -> float:
        """Key bits per coordinate, outlier channels included (norms not)."""
        outliers = self.key_outliers * self.key_outlier_bits
        return (self.key_regular_channels * self.key_bits + outliers) / self.head_dim

    @cached_property
    def uniform_values(self) -> bool:
        return self.value_mode == "uniform"

    @cached_property
    def key_index_bits(self) -> int:
        return self.key_bits if self.key_mode == "mse" else self.key_bits - 1

    @cached_property
    def prod(self) -> bool:
        return self.key_mode == "prod"

    @cached_property
    def key_norm(self) -> int:
        return 0

    @cached_property
    def key_residual_norm(self) -> int:
        return 2  # meaningful in prod mode only

    @cached_property
    def key_outlier_norm(self) -> int:
        return 2  # meaningful with split keys only

    @cached_property
    def value_norm(self) -> int:
        return 4 if self.prod or self.split_keys else 2

    @cached_property
    def value_zero(self) -> int:
        return self.value_norm + 2  # meaningful in uniform value mode only

    @cached_property
    def key_indices(self) -> int:
        return self.value_norm + (4 if self.uniform_values else 2)

    @cached_property
    def key_outlier_indices(self) -> int:
        return self.key_indices + packed_bytes(self.key_regular_channels, self.key_index_bits)

    @cached_property
    def key_index_bytes(self) -> int:
        outliers = packed_bytes(self.key_outliers, self.key_outlier_bits)
        return packed_bytes(self.key_regular_channels, self.key_index_bits) + outliers

    @cached_property
    def key_signs(self) -> int:
        return self.key_indices + self.key_index_bytes

    @cached_property
    def key_sign_bytes(self) -> int:
        return packed_bytes(self.head_dim, 1) if self.prod else 0

    @cached_property
    def value_indices(self) -> int:
        return self.key_signs + self.key_sign_bytes

    @cached_property
    def value_index_bytes(self) -> int:
        return packed_bytes(self.head_dim, self.value_bits)

    @cached_property
    def size(self) -> int:
        """Bytes the record uses."""
        return self.value_indices + self.value_index_bytes

    @cached_property
    def record_bytes(self) -> int:
        """Bytes the record occupies in the paged cache (padding included)."""
        return max(self.size, self.padded_size)

    def padded(self, record_bytes: int) -> RecordLayout:
        if record_bytes < self.size:
            raise ValueError(f"cannot pad a {self.size}-byte record to {record_bytes} bytes")
        return replace(self, padded_size=record_bytes)

    def kernel_fields(self) -> tuple[int, ...]:
        """The layout as the kernels receive it, in KERNEL_FIELDS order: the C++ ops take this
        tuple (their struct Layout), the Triton kernels the same values as constexprs."""
        return tuple(int(getattr(self, name)) for name in KERNEL_FIELDS)

    def compression_ratio(self, model_bytes_per_value: int = 2) -> float:
        """Bytes of K and V in the model dtype over the record's bytes (padding included)."""
        return 2 * self.head_dim * model_bytes_per_value / self.record_bytes


def _put_fp16(out: torch.Tensor, offset: int, value: torch.Tensor) -> None:
    out[..., offset : offset + 2] = (
        value.to(torch.float16).contiguous().view(torch.uint8).view(*value.shape, 2)
    )


def _get_fp16(records: torch.Tensor, offset: int) -> torch.Tensor:
    return records[..., offset : offset + 2].contiguous().view(torch.float16).squeeze(-1)


def encode_records(
    layout: RecordLayout, key: TurboCodes | SplitCodes, value: TurboCodes | UniformCodes
) -> torch.Tensor:
    """Key and value codes of the same leading shape [...] -> records uint8 [..., record_bytes]."""
    device = value.indices.device
    out = torch.zeros(*key.shape, layout.record_bytes, dtype=torch.uint8, device=device)
    if layout.split_keys:
        _put_fp16(out, layout.key_norm, key.regular.norms)
        _put_fp16(out, layout.key_outlier_norm, key.outlier.norms)
        out[..., layout.key_indices : layout.key_outlier_indices] = key.regular.indices
        out[..., layout.key_outlier_indices : layout.key_signs] = key.outlier.indices
    else:
        _put_fp16(out, layout.key_norm, key.norms)
        out[..., layout.key_indices : layout.key_signs] = key.indices
    if layout.prod:
        _put_fp16(out, layout.key_residual_norm, key.residual_norms)
        out[..., layout.key_signs : layout.value_indices] = key.signs
    if layout.uniform_values:
        _put_fp16(out, layout.value_norm, value.scale)
        _put_fp16(out, layout.value_zero, value.zero)
    else:
        _put_fp16(out, layout.value_norm, value.norms)
    out[..., layout.value_indices : layout.size] = value.indices
    return out


def decode_records(
    layout: RecordLayout, records: torch.Tensor
) -> tuple[TurboCodes | SplitCodes, TurboCodes | UniformCodes]:
    """records uint8 [..., >= size] -> (key codes, value codes)."""
    key: TurboCodes | SplitCodes
    if layout.split_keys:
        key = SplitCodes(
            TurboCodes(
                indices=records[..., layout.key_indices : layout.key_outlier_indices],
                norms=_get_fp16(records, layout.key_norm),
            ),
            TurboCodes(
                indices=records[..., layout.key_outlier_indices : layout.key_signs],
                norms=_get_fp16(records, layout.key_outlier_norm),
            ),
        )
    else:
        key = TurboCodes(
            indices=records[..., layout.key_indices : layout.key_signs],
            norms=_get_fp16(records, layout.key_norm),
        )
    if layout.prod:
        key.residual_norms = _get_fp16(records, layout.key_residual_norm)
        key.signs = records[..., layout.key_signs : layout.value_indices]
    indices = records[..., layout.value_indices : layout.size]
    if layout.uniform_values:
        scale, zero = _get_fp16(records, layout.value_norm), _get_fp16(records, layout.value_zero)
        return key, UniformCodes(indices=indices, scale=scale, zero=zero)
    return key, TurboCodes(indices=indices, norms=_get_fp16(records, layout.value_norm))
