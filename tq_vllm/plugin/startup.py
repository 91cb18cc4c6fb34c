"""The TurboQuant settings of a running vLLM deployment: checked at startup, used by workers."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tq_vllm.kernels.common import CODEBOOKS
from tq_vllm.kernels.decode.cpu_decode import BF16_DOTS_CHOICES, BF16_DOTS_ENV
from tq_vllm.kernels.dispatch import CODEBOOK_ENV, KERNEL_CHOICES, KERNELS_ENV, TRITON_EVERYWHERE
from tq_vllm.plugin import compat
from tq_vllm.plugin.config import ConfigError, TurboQuantConfig, load_config
from tq_vllm.record.layout import RecordLayout

logger = logging.getLogger("tq_vllm")
# TQ_VLLM_CUDA_GRAPHS=full lets vLLM capture decode-only steps whole, attention included
# (TurboQuantMetadataBuilder.get_cudagraph_support); unset or "piecewise", attention runs
# between vLLM's captured pieces. Opt-in until a GPU run has served with it.
CUDA_GRAPHS_ENV = "TQ_VLLM_CUDA_GRAPHS"
CUDA_GRAPH_MODES = ("piecewise", "full")
# Drafts that need no attention of their own: a verify step is then one more multi-token query
# over the compressed cache, which reads every key and value after the step's store.
SPECULATIVE_METHODS = ("ngram",)


@dataclass(frozen=True)
class Settings:
    config: TurboQuantConfig
    head_dim: int
    num_layers: int
    layouts: tuple[RecordLayout, ...]

    @property
    def largest_record_bytes(self) -> int:
        return max(layout.record_bytes for layout in self.layouts)

    def record_bytes(self, layer_name: str) -> int:
        return self.layouts[compat.layer_index(layer_name)].record_bytes


def unsupported_model_reasons(vllm_config: Any) -> list[str]:
    model = vllm_config.model_config
    reasons = []
    spec = vllm_config.speculative_config
    if spec is not None and spec.method not in SPECULATIVE_METHODS:
        # A draft model's own attention layers, and EAGLE-style drafts that read the target's
        # hidden states, have never run against compressed pages here.
        reasons.append(
            f"speculative decoding method {spec.method!r} is not supported "
            f"(supported: {', '.join(SPECULATIVE_METHODS)})"
        )
    if getattr(model, "use_mla", False):
        reasons.append("MLA attention is not supported")
    if getattr(model, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models are not supported")
    if getattr(model, "runner_type", "generate") != "generate":
        reasons.append(f"runner {model.runner_type!r} is not supported (generate only)")
    return reasons


def settings_from(vllm_config: Any) -> Settings:
    """The deployment's settings; raises ConfigError naming the problem."""
    config = load_config(vllm_config.additional_config)
    model = vllm_config.model_config
    head_dim = model.get_head_size()
    num_layers = model.get_total_num_hidden_layers()
    settings = Settings(config, head_dim, num_layers, tuple(config.layouts(head_dim, num_layers)))
    if config.key_outlier_bits:
        _check_outlier_heads(config, model.get_total_num_kv_heads())
    return settings


def _check_outlier_heads(config: TurboQuantConfig, num_kv_heads: int) -> None:
    heads = len(config.key_outlier_channels[0])
    if heads != num_kv_heads:
        raise ConfigError(
            f"key_outlier_channels list {heads} KV heads per layer; the model has "
            f"{num_kv_heads} (calibrate for this model)"
        )


def serves_with_triton(platform: Any) -> bool:
    """Whether this deployment's attention runs the Triton kernels (CUDA, or the interpreter
    switch of kernels/dispatch.py)."""
    return platform.is_cuda() or TRITON_EVERYWHERE


def unsupported_platform_reasons(platform: Any, env: Mapping[str, str]) -> list[str]:
    """Devices the kernels have not been tested on are refused, not routed to a guess."""
    reasons = []
    if platform.is_rocm():
        reasons.append("ROCm is not supported (the Triton kernels are tested on NVIDIA GPUs only)")
    elif not (platform.is_cuda() or platform.is_cpu()):
        reasons.append(f"device {platform.device_type!r} is not supported (CUDA and CPU only)")
    switches = {
        KERNELS_ENV: KERNEL_CHOICES,
        CODEBOOK_ENV: CODEBOOKS,
        BF16_DOTS_ENV: BF16_DOTS_CHOICES,
        CUDA_GRAPHS_ENV: CUDA_GRAPH_MODES,
    }
    for name, choices in switches.items():
        value = env.get(name, "")
        if value and value not in choices:
            reasons.append(f"{name}={value!r} is unknown (choices: {choices})")
    if (
        env.get(KERNELS_ENV) == "triton"
        and platform.is_cpu()
        and env.get("TRITON_INTERPRET") != "1"
    ):
        reasons.append(
            f"{KERNELS_ENV}=triton on CPU runs the Triton kernels in Triton's interpreter: "
            "set TRITON_INTERPRET=1 too"
        )
    return reasons


def full_cuda_graphs(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(CUDA_GRAPHS_ENV) == "full"


def check_vllm_config(vllm_config: Any) -> Settings:
    """Startup check (API server and engine): refuse what we cannot serve, log the config."""
    from vllm.platforms import current_platform

    reasons = unsupported_model_reasons(vllm_config)
    reasons += unsupported_platform_reasons(current_platform, os.environ)
    if reasons:
        raise ConfigError("--kv-cache-dtype turboquant: " + "; ".join(reasons))
    settings = settings_from(vllm_config)
    uniform = [i for i, layout in enumerate(settings.layouts) if layout.uniform_values]
    if uniform and serves_with_triton(current_platform):
        raise ConfigError(
            f"value_mode 'uniform' (layers {uniform}) runs on the CPU (PyTorch) path only; "
            "the CUDA kernels read Lloyd-Max value records: use value_mode 'mse'"
        )
    choose_window_block(vllm_config, settings)
    check_full_graphs(settings.config.exact_window, os.environ)
    model_bytes = vllm_config.model_config.dtype.itemsize
    logger.info("%s", settings.config.describe(settings.head_dim, settings.num_layers, model_bytes))
    return settings


def choose_window_block(vllm_config: Any, settings: Settings) -> None:
    """With an exact window, a block size the user gave must hold it (checked here, and the
    ring's size once vLLM collects the specs); one vLLM chose grows to the smallest that does."""
    window, cache = settings.config.exact_window, vllm_config.cache_config
    given = compat.user_block_size(cache)
    check_exact_window(window, given)
    if window and given is None:
        block = smallest_block(vllm_config, settings)
        if cache.block_size < block or cache.block_size % window:
            logger.info(
                "exact_window %d: %d-token blocks (was %d)", window, block, cache.block_size
            )
            cache.block_size = block


def smallest_block(vllm_config: Any, settings: Settings) -> int:
    """The smallest block size (a power of two, 16 or more) that W divides and whose block of
    records holds a 16-bit ring: the block size where the user gave none
    (vLLM's CUDA default, 16, holds neither; its CPU default, 128, not every config's ring)."""
    window = settings.config.exact_window
    ring = ring_bytes(ring_size(vllm_config, window), settings.head_dim, 2)
    block = max(16, window)
    while block * settings.largest_record_bytes < ring:
        block *= 2
    return block


def ring_size(vllm_config: Any, window: int) -> int:
    """W slots, plus the speculative lookahead: a rejected draft's slot is then one that no
    later query reads exactly."""
    spec = vllm_config.speculative_config
    lookahead = spec.num_speculative_tokens if spec is not None else 0
    return window + lookahead


def ring_bytes(slots: int, head_dim: int, itemsize: int) -> int:
    """A ring's bytes per KV head: keys and values of `slots` tokens side by side."""
    return slots * 2 * head_dim * itemsize


def check_exact_window(window: int, block_size: int | None) -> None:
    """The rule's anchors are the block boundaries (ExactRule: W must divide the block size), so
    a prefix-cache hit (whole blocks) reads nothing exactly from a ring it has not filled.
    block_size None: vLLM picks it later, and the ring's metadata builder asks again."""
    if window and block_size and block_size % window:
        raise ConfigError(f"exact_window {window} must divide the block size ({block_size} tokens)")


def check_full_graphs(exact_window: int, env: Mapping[str, str]) -> None:
    if exact_window and full_cuda_graphs(env):
        raise ConfigError(
            f"{CUDA_GRAPHS_ENV}=full with exact_window: the window's ring metadata reads "
            "sequence lengths on the host, which a captured graph cannot; unset one of them"
        )


_active: tuple[Any, Settings] | None = None  # (the vllm_config, its settings)


def activate(vllm_config: Any) -> Settings:
    """Called while the model is built (the attention impls), so that the layers' specs, which
    see no config, can size the records of this process's deployment. Every layer asks; the
    config files are read once per deployment."""
    global _active
    if _active is None or _active[0] is not vllm_config:
        _active = (vllm_config, settings_from(vllm_config))
        compat.size_pages_per_layer(lambda name: active_settings().record_bytes(name))
    return _active[1]


def is_active() -> bool:
    return _active is not None


def active_vllm_config() -> Any:
    if _active is None:
        raise RuntimeError("vLLM's config requested before any TurboQuant layer was built")
    return _active[0]


def active_settings() -> Settings:
    if _active is None:
        raise RuntimeError("TurboQuant settings requested before any TurboQuant layer was built")
    return _active[1]
