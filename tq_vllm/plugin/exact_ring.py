"""The exact window's storage in vLLM (kernels/window/exact.py has the rule): one companion
layer per TurboQuant attention layer, whose cache is one ring of R slots per request, in vLLM's
own KV budget.

Ring: what vLLM sees, a layer with a CircularBufferSpec (one block per request for its whole
life, K and V side by side in the model dtype, or bf16 where that fits a block of records and
the model's float32 does not), registered in the forward context once the
model's weights are loaded (attach_ring), before vLLM collects the layers' cache specs.
RingMetadataBuilder: per step, each request's ring and the step's ExactIndex, built once and
shared by every layer. The attention layer's impl finds its ring as `impl.ring` and the
step's index in the forward context.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from tq_vllm.kernels.window.exact import ExactIndex, ExactRule, exact_index
from tq_vllm.plugin import compat

RING_SUFFIX = ".tq_exact_ring"
logger = logging.getLogger("tq_vllm")


@dataclass
class RingMetadata:
    index: ExactIndex
    rule: ExactRule


class RingMetadataBuilder(AttentionMetadataBuilder[RingMetadata]):
    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from tq_vllm.plugin import startup

        window = startup.active_settings().config.exact_window
        self.ring_size = kv_cache_spec.block_size
        # Startup may not have known the block size: vLLM has chosen it since.
        block_size = vllm_config.cache_config.block_size
        startup.check_exact_window(window, block_size)
        self.rule = ExactRule(window, anchor=block_size)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> RingMetadata:
        m = common_attn_metadata
        rings = m.block_table_tensor[: m.num_reqs, 0].cpu()
        lens = m.seq_lens[: m.num_reqs].cpu()
        index = exact_index(m.query_start_loc_cpu, lens, rings, self.rule, self.ring_size)
        return RingMetadata(index.to(self.device), self.rule)


class RingBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TQ_EXACT_RING"

    @staticmethod
    def get_builder_cls() -> type[RingMetadataBuilder]:
        return RingMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type:
        raise NotImplementedError("a ring is read and written by its attention layer")

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int, block_size: int, num_kv_heads: int, head_size: int, cache_dtype: str = ""
    ) -> tuple[int, ...]:
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)


class Ring(torch.nn.Module, AttentionLayerBase):
    """The ring of one attention layer; registered in vLLM's forward context beside it."""

    def __init__(self, layer_name: str, num_kv_heads: int, head_size: int, dtype: Any) -> None:
        super().__init__()
        self.layer_name = layer_name + RING_SUFFIX
        self.num_kv_heads, self.head_size, self.dtype = num_kv_heads, head_size, dtype
        self.kv_cache = torch.tensor([])

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache

    def get_attn_backend(self) -> type[RingBackend]:
        return RingBackend

    def get_kv_cache_spec(self, vllm_config: Any) -> Any:
        from tq_vllm.plugin import startup

        settings = startup.active_settings()
        slots = startup.ring_size(vllm_config, settings.config.exact_window)
        block_size = vllm_config.cache_config.block_size
        records = block_size * settings.largest_record_bytes
        # vLLM gives every block of both groups the larger page: a ring up to a block of
        # records costs nothing more, one larger would pad every block to it.
        if (
            startup.ring_bytes(slots, self.head_size, self.dtype.itemsize) > records
            and self.dtype.itemsize > 2
        ):
            # A float32 model: its ring in bf16 (2^-9 of each value) rather than no window.
            self.dtype = torch.bfloat16
            _say_bf16_rings(slots, block_size)
        ring_bytes = startup.ring_bytes(slots, self.head_size, self.dtype.itemsize)
        if ring_bytes > records:
            raise startup.ConfigError(
                f"exact_window: a ring of {slots} tokens ({ring_bytes} bytes per KV head) is "
                f"larger than a {block_size}-token block of records ({records}), so vLLM would "
                "pad every block to it: use a smaller exact_window or a larger --block-size"
            )
        return compat.ring_spec(slots, self.num_kv_heads, self.head_size, self.dtype)


@functools.cache
def _say_bf16_rings(slots: int, block_size: int) -> None:
    logger.info(
        "exact_window: rings of %d tokens in bf16 (in float32 they would outgrow a %d-token "
        "block of records)",
        slots,
        block_size,
    )


def attach_ring(impl: Any, vllm_config: Any, dtype: torch.dtype) -> None:
    """Give the attention layer whose impl is `impl` its ring."""
    context = vllm_config.compilation_config.static_forward_context
    layer = next(module for module in context.values() if getattr(module, "impl", None) is impl)
    ring = Ring(layer.layer_name, impl.num_kv_heads, impl.head_size, dtype)
    if ring.layer_name not in context:  # weights can be loaded again (sleep mode, reload)
        context[ring.layer_name] = ring
        layer.tq_exact_ring = ring  # a submodule of its layer, as vLLM's layers are
        impl.ring = ring  # a plain attribute: a Module's attribute lookup is a Python call


def ring_metadata(ring: Ring) -> RingMetadata:
    return compat.forward_metadata(ring.layer_name)
