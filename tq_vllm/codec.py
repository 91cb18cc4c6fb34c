"""One layer's key/value codec: the bridge between the quantizer math and the paged record.

Attention runs in the rotated domain: <q, k> = <R q, R k> and sum_i p_i v_i = R^T sum_i p_i R v_i,
so a layer rotates its queries once, compares them with R k_hat straight from the codes, and
rotates the attention output back once; dequantized keys and values never leave that domain.
Uniform values (value_mode "uniform", upstream vLLM's format) are quantized unrotated, so they
are rotated after dequantization: a matmul more, on the PyTorch path only.
"""

from __future__ import annotations

import torch

from tq_vllm.layout import RecordLayout, decode_records, encode_records
from tq_vllm.quantizer import TurboQuantizer
from tq_vllm.uniform import UniformQuantizer


class LayerCodec:
    def __init__(
        self, layout: RecordLayout, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        self.layout = layout
        self.head_dim = layout.head_dim
        self.key = TurboQuantizer(layout.head_dim, layout.key_bits, layout.key_mode, seed, device)
        self.value: TurboQuantizer | UniformQuantizer
        if layout.uniform_values:
            self.value = UniformQuantizer(layout.head_dim, layout.value_bits)
        else:
            self.value = TurboQuantizer(layout.head_dim, layout.value_bits, "mse", seed, device)
        self.rotation = self.key.rotation  # R, float32 [d, d]; keys and values share it

    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """key, value [..., d] -> records uint8 [..., record_bytes]. No input checks."""
        if self.layout.uniform_values:
            value_codes = self.value.quantize(value)
        else:
            value_codes = self.value.quantize(value, check=False)
        return encode_records(self.layout, self.key.quantize(key, check=False), value_codes)

    def decode_rotated(self, records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """records [..., >= size] -> (R k_hat, R v_hat), float32 [..., d] each."""
        key, value = decode_records(self.layout, records)
        if self.layout.uniform_values:
            return self.key.dequantize_rotated(key), self.rotate(self.value.dequantize(value))
        return self.key.dequantize_rotated(key), self.value.dequantize_rotated(value)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> R x, float32."""
        return x.float() @ self.rotation.T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """y [..., d] -> R^T y, float32."""
        return y.float() @ self.rotation
