"""The vLLM attention backend for --kv-cache-dtype turboquant, in vLLM's four parts.

Metadata: what one step's attention needs. MetadataBuilder: per step, which requests are
decodes and where their blocks are. Backend: what vLLM asks about capabilities and the cache
spec. Impl: quantize the step's new tokens into the paged records and attend over them (both in
forward), through kernels/dispatch.py, which picks the Triton kernels on CUDA and the C++ ops
(else the PyTorch references) on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.kernels.common import TRITON_HEAD_DIMS
from tq_vllm.kernels.window.windowed import windowed_step
from tq_vllm.plugin import compat, exact_ring, startup
from tq_vllm.record.codec import LayerCodec

logger = logging.getLogger("tq_vllm")


@dataclass
class TurboQuantMetadata:
    num_actual_tokens: int
    num_reqs: int
    num_decodes: int  # requests [0, num_decodes) have one query token each
    max_query_len: int  # host copies of the batch's longest chunk and sequence
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs]
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens]


class TurboQuantMetadataBuilder(AttentionMetadataBuilder[TurboQuantMetadata]):
    # vLLM moves requests with one query token to the front of the batch, so decodes can take
    # the batched decode path and the rest the context path.
    reorder_batch_threshold: int | None = 1

    def __init__(
        self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    @classmethod
    def get_cudagraph_support(cls, vllm_config: Any, kv_cache_spec: Any) -> AttentionCGSupport:
        """vLLM asks once per engine, and captures full graphs of decode-only batches only if
        every backend allows it. The decode path can be captured: it never waits on the
        device, sizes its splits from the metadata's max_seq_len (the model's maximum while
        vLLM captures, so a replay has splits enough for any length; each split finds its
        tokens from the device's seq_lens), and a padded request's length 0 reads nothing.
        Opt-in (startup.CUDA_GRAPHS_ENV) until a GPU serves with it."""
        if startup.full_cuda_graphs():
            return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
        return AttentionCGSupport.NEVER

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TurboQuantMetadata:
        m = common_attn_metadata
        q_lens = (m.query_start_loc_cpu[1:] - m.query_start_loc_cpu[:-1]).tolist()
        num_decodes = 0
        while num_decodes < m.num_reqs and q_lens[num_decodes] == 1:
            num_decodes += 1
        return TurboQuantMetadata(
            num_actual_tokens=m.num_actual_tokens,
            num_reqs=m.num_reqs,
            num_decodes=num_decodes,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_table=m.block_table_tensor,
            slot_mapping=m.slot_mapping,
        )


class TurboQuantBackend(AttentionBackend):
    # forward stores the step's tokens itself: vLLM's separate cache-update call cost a served
    # CPU decode step ~40 us per layer of Python and dispatch around a ~8 us store.
    forward_includes_kv_cache_update = True
    accept_output_buffer = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [compat.DTYPE]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # the registry slot compat.register_attention_backend fills

    @staticmethod
    def get_impl_cls() -> type[TurboQuantImpl]:
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls() -> type[TurboQuantMetadataBuilder]:
        return TurboQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        # With an exact window and no --block-size, blocks that hold a window and a ring's
        # worth of records: on CUDA vLLM asks once the model is built and picks its block size
        # by the answer (update_block_size_for_backend). A size the user gave is checked by the
        # plugin instead, whose errors name the window.
        if startup.is_active() and startup.active_settings().config.exact_window:
            vllm_config = startup.active_vllm_config()
            if compat.user_block_size(vllm_config.cache_config) is None:
                block = startup.smallest_block(vllm_config, startup.active_settings())
                return [MultipleOf(block)]
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[Any, ...]:
        return (compat.kv_cache_layout_hnd(),)

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        """Size pages from the packed records: vLLM then fits proportionally more blocks. A
        layer's spec arrives with its own record size (compat.size_pages_per_layer); specs that
        vLLM builds to choose block sizes get the largest record."""
        if spec.state_content_bytes is not None:
            return spec
        return replace(spec, state_content_bytes=startup.active_settings().largest_record_bytes)

    @classmethod
    def unsupported_reasons(cls, selector_config: Any) -> list[str]:
        """Why a layer described by vLLM's AttentionSelectorConfig cannot use this backend."""
        c = selector_config._asdict()
        checks = {
            "use_mla": "MLA attention",
            "use_sparse": "sparse attention",
            "has_sink": "attention sinks",
            "use_non_causal": "non-causal attention",
            "use_mm_prefix": "multimodal prefix attention",
            "use_dcp": "decode context parallelism",
            "use_pcp": "prefill context parallelism",
            "use_rswa": "restricted sliding-window attention",
            "use_kv_connector": "KV connectors (they move pages as model-dtype K/V)",
            "use_batch_invariant": "batch-invariant mode",
        }
        reasons = [f"{what} is not supported" for key, what in checks.items() if c.get(key)]
        if c.get("attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            reasons.append(f"attention type {c['attn_type']!r} is not supported (decoder only)")
        head_size = c.get("head_size", 0)
        if head_size < 16:
            reasons.append(f"head_size {head_size} is below 16")
        from vllm.platforms import current_platform

        if startup.serves_with_triton(current_platform) and head_size not in TRITON_HEAD_DIMS:
            reasons.append(f"head_size {head_size}: the Triton kernels support {TRITON_HEAD_DIMS}")
        return reasons


class TurboQuantImpl(AttentionImpl[TurboQuantMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = compat.DTYPE,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            "attention sinks": extra.get("sinks") is not None,
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise NotImplementedError(
                f"--kv-cache-dtype {compat.DTYPE} does not support: {', '.join(refused)}"
            )
        from vllm.config import get_current_vllm_config

        self.settings = startup.activate(get_current_vllm_config())
        if head_size != self.settings.head_dim:
            raise NotImplementedError(
                f"layer head_size {head_size} differs from the model's head_dim "
                f"{self.settings.head_dim}: one record layout per model is supported"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        # A local layer's window: a query at position p sees p - W < t <= p.
        self.sliding_window = sliding_window
        self.exact_window = self.settings.config.exact_window
        self.ring: exact_ring.Ring | None = None  # exact_ring.attach_ring's, with an exact window
        if self.exact_window and sliding_window is not None:
            raise NotImplementedError(
                "exact_window on a model with sliding-window layers is not supported yet"
            )
        self._codecs: dict[tuple[str, torch.device], LayerCodec] = {}
        from vllm.platforms import current_platform

        if not startup.serves_with_triton(current_platform):
            # Build (or load) the C++ CPU ops now, not in the first request's forward.
            cpu_extension.available()

    def _codec(self, layer: AttentionLayer, device: torch.device) -> LayerCodec:
        name = getattr(layer, "layer_name", "")
        codec = self._codecs.get((name, device))
        if codec is None:
            index = compat.layer_index(name)
            config = self.settings.config
            layout = self.settings.layouts[index]
            channels = None
            if layout.split_keys:  # this rank's KV heads' channel lists
                rank, size = compat.tensor_parallel()
                heads = local_kv_heads(len(config.key_outlier_channels[index]), rank, size)
                channels = config.outlier_channels(index)[heads]
            codec = LayerCodec(layout, config.seed, device, channels)
            self._codecs[(name, device)] = codec
            if len(self._codecs) == 1:
                logger.info(
                    "TurboQuant attention backend serving %s on %s with %s (%d-byte records)",
                    name,
                    device,
                    dispatch.attention_kernels(device, codec),
                    codec.layout.record_bytes,
                )
        return codec

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        if self.exact_window:  # the model is built: its layers can get their rings now
            exact_ring.attach_ring(self, startup.active_vllm_config(), act_dtype)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TurboQuantMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert output is not None, "vLLM passes a preallocated output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported")
        if attn_metadata is None or kv_cache.numel() == 0:  # profiling / warm-up run
            return output
        m = attn_metadata
        n, d = m.num_actual_tokens, m.num_decodes
        codec = self._codec(layer, kv_cache.device)
        query = query[:n].view(n, self.num_heads, self.head_size)
        key = key[:n].view(n, self.num_kv_heads, self.head_size)
        value = value[:n].view(n, self.num_kv_heads, self.head_size)
        slots = m.slot_mapping[:n]  # where vLLM pads a step, the padding's slots are -1
        out = output[:n].view(n, self.num_heads, self.head_size)
        if self.exact_window:
            window = exact_ring.ring_metadata(self.ring)
            windowed_step(
                query, key, value, out, kv_cache, slots, m.block_table, self.ring.kv_cache,
                window.index, codec, self.scale, window.rule,
                self.settings.config.sparse_v, self.settings.config.window_prefill == "chunk",
            )  # fmt: skip
            return output
        # The new tokens first: the context path reads them back from the cache.
        dispatch.store_kv(key, value, kv_cache, slots, codec)
        if d:
            out[:d] = dispatch.decode_attention(
                query[:d],
                kv_cache,
                m.block_table[:d],
                m.seq_lens[:d],
                codec,
                self.scale,
                m.max_seq_len,
                self.settings.config.sparse_v,
                self.sliding_window,
            )
        if d < m.num_reqs:
            # New tokens are read back from the cache like the context: every query sees what
            # a later decode will, whatever the chunking or prefix-cache hits.
            out[d:] = dispatch.context_attention(
                query[d:],
                None,
                None,
                kv_cache,
                m.block_table[d:],
                m.query_start_loc[d:] - m.query_start_loc[d],
                m.seq_lens[d:],
                codec,
                self.scale,
                m.max_query_len,
                self.settings.config.sparse_v,
                self.sliding_window,
            )
        return output


def local_kv_heads(total: int, rank: int, size: int) -> list[int]:
    """The KV heads tensor-parallel rank `rank` of `size` holds, as vLLM shards them: a slice
    of total / size heads each, or, with more ranks than heads, one head per size / total
    consecutive ranks."""
    if size <= total:
        per_rank = total // size
        return list(range(rank * per_rank, (rank + 1) * per_rank))
    return [rank // (size // total)]
