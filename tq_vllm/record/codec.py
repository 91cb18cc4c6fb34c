"""One layer's key/value codec: the bridge between the quantizer math and the paged record.

Attention runs in the rotated domain: <q, k> = <R q, R k> and sum_i p_i v_i = R^T sum_i p_i R v_i,
so a layer rotates its queries once, compares them with R k_hat straight from the codes, and
rotates the attention output back once; dequantized keys and values never leave that domain.
Uniform values (value_mode "uniform", upstream vLLM's format) are quantized unrotated, so they
are rotated after dequantization: a matmul more, on the PyTorch path only. Split keys (outlier
channels, quant/outliers.py) have their own rotation per KV head, M_h: queries are rotated by it
(rotate_queries), the attention output, a sum of values, still by R.
"""

from __future__ import annotations

import torch

from tq_vllm.quant.outliers import SplitKeyQuantizer
from tq_vllm.quant.quantizer import SERVED_GAIN, TurboQuantizer
from tq_vllm.quant.rotation import rotation_matrix, rows_times
from tq_vllm.quant.uniform import UniformQuantizer
from tq_vllm.record.layout import RecordLayout, decode_records, encode_records


class LayerCodec:
    def __init__(
        self,
        layout: RecordLayout,
        seed: int = 0,
        device: torch.device | str | None = None,
        outlier_channels: torch.Tensor | None = None,
    ) -> None:
        """outlier_channels int [Hk, layout.key_outliers]: each KV head's outlier channels,
        required for (and only for) a layout with split keys."""
        self.layout = layout
        self.head_dim = layout.head_dim
        self.key: TurboQuantizer | SplitKeyQuantizer
        if layout.split_keys != (outlier_channels is not None):
            raise ValueError("outlier_channels are required for split keys, and only for them")
        if outlier_channels is not None:
            if outlier_channels.dim() != 2 or outlier_channels.shape[1] != layout.key_outliers:
                raise ValueError(
                    f"the layout splits off {layout.key_outliers} outlier channels per head; "
                    f"outlier_channels has shape {tuple(outlier_channels.shape)}"
                )
            self.key = SplitKeyQuantizer(
                layout.head_dim,
                layout.key_bits,
                layout.key_outlier_bits,
                outlier_channels,
                seed,
                device,
            )
        else:
            self.key = TurboQuantizer(
                layout.head_dim, layout.key_bits, layout.key_mode, seed, device, gain=SERVED_GAIN
            )
        self.value: TurboQuantizer | UniformQuantizer
        if layout.uniform_values:
            self.value = UniformQuantizer(layout.head_dim, layout.value_bits)
        else:
            self.value = TurboQuantizer(
                layout.head_dim, layout.value_bits, "mse", seed, device, gain=SERVED_GAIN
            )
        # R, float32 [d, d]: the values' rotation, and the keys' unless they are split.
        # Contiguous: the C++ attention takes it as is (QR leaves some sizes transposed).
        self.rotation = rotation_matrix(layout.head_dim, seed, device).contiguous()

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """key, value [..., Hk, d] -> records uint8 [..., Hk, record_bytes]. No input checks."""
        if self.layout.uniform_values:
            value_codes = self.value.quantize(value)
        else:
            value_codes = self.value.quantize(value, check=False)
        if isinstance(self.key, SplitKeyQuantizer):
            key_codes = self.key.quantize(key)
        else:
            key_codes = self.key.quantize(key, check=False)
        return encode_records(self.layout, key_codes, value_codes)

    def decode_rotated(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """records [..., >= size] -> (k_hat, R v_hat) in the rotated domains (R k_hat, or M_h
        k_hat for split keys), float32 [..., d] each."""
        key, value = decode_records(self.layout, records)
        if self.layout.uniform_values:
            return self.key.dequantize_rotated(key), self.rotate(self.value.dequantize(value))
        return self.key.dequantize_rotated(key), self.value.dequantize_rotated(value)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> R x, float32 (values; keys and queries unless split)."""
        return rows_times(x.float(), self.rotation.T)

    def rotate_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Queries or keys x [..., H, d] (H a multiple of Hk, heads in vLLM's order) -> their
        keys' rotated domain, float32."""
        if isinstance(self.key, SplitKeyQuantizer):
            return self.key.rotate(x)
        return self.rotate(x)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """y [..., d] -> R^T y, float32."""
        return rows_times(y.float(), self.rotation)
