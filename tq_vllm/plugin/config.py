"""Per-deployment TurboQuant config: which bits each layer's keys and values get.

Sources, later ones overriding earlier ones key by key:
  1. configs/default.yaml (the recommended config),
  2. the file named by the environment variable TQ_VLLM_CONFIG,
  3. --additional-config '{"turboquant": {"config": "<file or preset name>", ...inline keys}}'.

Fields (all optional):
  key_bits, value_bits   bits per coordinate, 1..8
  key_mode               "mse" (all bits to the Lloyd-Max stage) or "prod" (one bit to QJL)
  value_mode             "mse" (rotated, Lloyd-Max) or "uniform" (upstream vLLM's values:
                         fp16 scale and zero point per vector; PyTorch/CPU path only)
  seed                   rotation / QJL seed; every process derives identical matrices from it
  keep_first_layers, keep_last_layers, keep_key_bits, keep_value_bits
                         the first / last N attention layers use keep_*_bits instead
  layers                 per-layer overrides {layer_index: {key_bits, value_bits, key_mode,
                         value_mode}};
                         negative indices count from the end
  key_outlier_bits, key_outlier_channels
                         outlier channels (the paper's fractional rates, quant/outliers.py): per
                         attention layer, per KV head, a list of n key channels quantized
                         apart at key_outlier_bits (the rest at the layer's key_bits); written
                         for one model by `tq-vllm calibrate`
  sparse_v               0 (default): every value is read. t in (0, 1): the fused kernels skip
                         a tile of values whose softmax weights all lie below t times their
                         row's running maximum (the weights still count; the dense prefill and
                         the references read everything)
  exact_window           W (a power of two, 16..256; configs/default.yaml: 32): a query at
                         position p also reads its newest tokens exact (the model dtype):
                         W - W/4 + 1 .. W of them, never reaching back past the start of its
                         vLLM block (kernels/window/exact.py, ExactRule), stored in one ring per
                         request and layer inside vLLM's KV budget. 0: every token is read from
                         its record (the named presets other than the default and k5v4-w32).
                         Inline keys keep the default's window unless they set this one
  window_prefill         with exact_window, what the rows of a prefill chunk read exactly where
                         the chunk runs in vLLM's CPU kernel (kernels/window/dense_window.py):
                         "chunk" (default): the chunk's own tokens and those from s(first row)
                         on, one causal attention; "decode": each row what a decode step at its
                         position reads (the rule), so results do not depend on the chunking.
                         Elsewhere (CUDA, the fused fallback) prefill rows always read as decode
                         rows do. The eval measures with "decode": the quality of each token as
                         generated

Every layer's record has its own size: vLLM gives each layer its own page (one KV-cache group,
per-layer page sizes), so higher precision on a few layers costs bytes on those layers only.
To store a layer in the model dtype instead, use vLLM's --kv-cache-dtype-skip-layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from tq_vllm import configs as presets
from tq_vllm.quant.centroids import MIN_HEAD_DIM, check_bits
from tq_vllm.quant.outliers import check_channels
from tq_vllm.quant.quantizer import MODES
from tq_vllm.record.layout import VALUE_MODES, RecordLayout

CONFIG_DIR = Path(presets.__file__).resolve().parent  # the repository's configs/
ENV_VAR = "TQ_VLLM_CONFIG"
LAYER_FIELDS = ("key_bits", "value_bits", "key_mode", "value_mode")
# Powers of two, so that they divide vLLM's block sizes: a prefix-cache hit then starts at an
# anchor of the rule (ExactRule), and needs nothing from a ring it has not filled.
EXACT_WINDOWS = (16, 32, 64, 128, 256)
WINDOW_PREFILLS = ("chunk", "decode")


class ConfigError(ValueError):
    """A TurboQuant config that cannot be used; the message names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(f"TurboQuant config: {message}")


@dataclass(frozen=True)
class LayerBits:
    key_bits: int
    value_bits: int
    key_mode: str
    value_mode: str = "mse"
    key_outliers: int = 0
    key_outlier_bits: int = 0

    def layout(self, head_dim: int) -> RecordLayout:
        return RecordLayout(
            head_dim,
            self.key_bits,
            self.key_mode,
            self.value_bits,
            value_mode=self.value_mode,
            key_outliers=self.key_outliers,
            key_outlier_bits=self.key_outlier_bits,
        )


@dataclass(frozen=True)
class TurboQuantConfig:
    key_bits: int = 3
    value_bits: int = 3
    key_mode: str = "mse"
    value_mode: str = "mse"
    seed: int = 0
    keep_first_layers: int = 0
    keep_last_layers: int = 0
    keep_key_bits: int = 8
    keep_value_bits: int = 8
    layers: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    key_outlier_bits: int = 0  # 0: no outlier channels
    key_outlier_channels: Sequence[Any] = ()  # [layer][kv_head] -> channel indices
    sparse_v: float = 0.0  # 0: off
    exact_window: int = 0  # 0: off
    window_prefill: str = "chunk"
    source: str = "defaults"

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits", "keep_key_bits", "keep_value_bits"):
            _check_bits_field(getattr(self, name), name)
        _check_mode_field(self.key_mode, "key_mode")
        _check_value_mode_field(self.value_mode, "value_mode")
        if self.key_mode == "prod" and self.key_bits < 2:
            raise ConfigError("key_bits must be >= 2 with key_mode 'prod' (one bit goes to QJL)")
        for name in ("seed", "keep_first_layers", "keep_last_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(self.layers, Mapping):
            raise ConfigError(
                f"layers must be a mapping of layer index to fields, got {self.layers!r}"
            )
        for index, override in self.layers.items():
            where = f"layers[{index!r}]"
            if isinstance(index, bool) or not isinstance(index, int):
                raise ConfigError(f"{where}: layer index must be an integer")
            if not isinstance(override, Mapping):
                raise ConfigError(f"{where} must be a mapping, got {override!r}")
            for key, value in override.items():
                if key not in LAYER_FIELDS:
                    raise ConfigError(f"{where}.{key}: unknown field (known: {LAYER_FIELDS})")
                if key == "key_mode":
                    _check_mode_field(value, f"{where}.key_mode")
                elif key == "value_mode":
                    _check_value_mode_field(value, f"{where}.value_mode")
                else:
                    _check_bits_field(value, f"{where}.{key}")
        self._check_outliers()
        sparse = self.sparse_v
        if isinstance(sparse, bool) or not isinstance(sparse, (int, float)) or not 0 <= sparse < 1:
            raise ConfigError(f"sparse_v must be a number in [0, 1) (0: off), got {sparse!r}")
        w = self.exact_window
        if w != 0 and (not isinstance(w, int) or isinstance(w, bool) or w not in EXACT_WINDOWS):
            raise ConfigError(
                f"exact_window must be 0 (off) or a power of two in 16..256 tokens, got {w!r}"
            )
        if self.window_prefill not in WINDOW_PREFILLS:
            raise ConfigError(
                f"window_prefill must be one of {WINDOW_PREFILLS}, got {self.window_prefill!r}"
            )

    def _check_outliers(self) -> None:
        bits, channels = self.key_outlier_bits, self.key_outlier_channels or ()
        if not isinstance(channels, Sequence) or isinstance(channels, str):
            raise ConfigError("key_outlier_channels must be a list (per layer)")
        if bits == 0:
            if channels:
                raise ConfigError(
                    "key_outlier_channels are given but key_outlier_bits is 0 (to turn outlier "
                    "channels off, set key_outlier_channels: [] too)"
                )
            return
        _check_bits_field(bits, "key_outlier_bits")
        if not channels:
            raise ConfigError(
                "key_outlier_bits needs key_outlier_channels (per layer, per KV head; "
                "`tq-vllm calibrate` writes them)"
            )
        shape_error = ConfigError(
            "key_outlier_channels must be a list (per layer) of lists (per KV head) of "
            "channel-index lists of integers, all of one length"
        )
        if not all(isinstance(heads, Sequence) and heads for heads in channels):
            raise shape_error
        lists = [chosen for heads in channels for chosen in heads]
        if not all(isinstance(chosen, Sequence) for chosen in lists):
            raise shape_error
        if len({len(heads) for heads in channels}) != 1 or len(set(map(len, lists))) != 1:
            raise shape_error
        if not all(isinstance(c, int) and not isinstance(c, bool) for x in lists for c in x):
            raise shape_error

    def outlier_channels(self, layer: int) -> torch.Tensor | None:
        """Layer `layer`'s outlier channels, int64 [Hk, n] (used where its layout splits keys);
        None without outlier channels."""
        if not self.key_outlier_bits:
            return None
        return torch.tensor(self.key_outlier_channels[layer], dtype=torch.int64)

    def layer_bits(self, layer: int, num_layers: int) -> LayerBits:
        """Bits of attention layer `layer` (0-based) in a model with num_layers of them."""
        bits = LayerBits(self.key_bits, self.value_bits, self.key_mode, self.value_mode)
        if layer < self.keep_first_layers or layer >= num_layers - self.keep_last_layers:
            bits = replace(bits, key_bits=self.keep_key_bits, value_bits=self.keep_value_bits)
        for index, override in self.layers.items():
            if index % num_layers == layer and -num_layers <= index < num_layers:
                bits = replace(bits, **override)
        if bits.key_mode == "prod" and bits.key_bits < 2:
            raise ConfigError(f"layer {layer}: key_bits must be >= 2 with key_mode 'prod'")
        bits = self._with_outliers(bits)
        if bits.key_outliers and bits.key_mode != "mse":
            raise ConfigError(f"layer {layer}: outlier channels need key_mode 'mse'")
        return bits

    def _with_outliers(self, bits: LayerBits) -> LayerBits:
        """Outlier channels for a layer whose keys have fewer bits than key_outlier_bits;
        layers kept at that precision or more (keep_*, layers) keep plain keys."""
        if not self.key_outlier_bits or bits.key_bits >= self.key_outlier_bits:
            return bits
        count = len(self.key_outlier_channels[0][0])
        return replace(bits, key_outliers=count, key_outlier_bits=self.key_outlier_bits)

    def layouts(self, head_dim: int, num_layers: int) -> list[RecordLayout]:
        """Every layer's record layout, each at its own size."""
        if head_dim < MIN_HEAD_DIM:
            raise ConfigError(f"head_dim {head_dim} is below the supported minimum {MIN_HEAD_DIM}")
        if self.keep_first_layers + self.keep_last_layers > num_layers:
            raise ConfigError(
                f"keep_first_layers ({self.keep_first_layers}) + keep_last_layers "
                f"({self.keep_last_layers}) exceed the model's {num_layers} attention layers"
            )
        named: dict[int, int] = {}  # layer -> the index that named it (negative ones count back)
        for index in self.layers:
            if not -num_layers <= index < num_layers:
                raise ConfigError(f"layers[{index}]: the model has {num_layers} attention layers")
            if index % num_layers in named:
                raise ConfigError(
                    f"layers[{named[index % num_layers]}] and layers[{index}] both override "
                    f"layer {index % num_layers} of {num_layers}"
                )
            named[index % num_layers] = index
        if self.key_outlier_bits:
            if len(self.key_outlier_channels) != num_layers:
                raise ConfigError(
                    f"key_outlier_channels lists {len(self.key_outlier_channels)} layers; the "
                    f"model has {num_layers} attention layers (calibrate for this model)"
                )
            for layer in range(num_layers):
                try:
                    check_channels(self.outlier_channels(layer), head_dim)
                except ValueError as err:
                    raise ConfigError(f"key_outlier_channels[{layer}]: {err}") from None
        return [self.layer_bits(i, num_layers).layout(head_dim) for i in range(num_layers)]

    def describe(self, head_dim: int, num_layers: int, model_bytes_per_value: int = 2) -> str:
        layouts = self.layouts(head_dim, num_layers)
        base = self._with_outliers(
            LayerBits(self.key_bits, self.value_bits, self.key_mode, self.value_mode)
        ).layout(head_dim)
        values = " (uniform)" if base.uniform_values else ""
        keys = f"K{self.key_bits}"
        if base.split_keys:
            n, rate = base.key_outliers, base.key_rate
            keys += f" + {n} outlier channels at {self.key_outlier_bits} bits = K{rate:g}"
        dense = 2 * head_dim * model_bytes_per_value
        text = (
            f"TurboQuant KV cache ({self.source}): {keys} ({self.key_mode}) "
            f"V{self.value_bits}{values}, seed {self.seed}, head_dim {head_dim}: "
            f"{base.record_bytes} bytes per token per KV head (model dtype: {dense}), "
            f"{base.compression_ratio(model_bytes_per_value):.2f}x"
        )
        others = [i for i, layout in enumerate(layouts) if layout.record_bytes != base.record_bytes]
        if others:
            sizes = ", ".join(f"layer {i}: {layouts[i].record_bytes}" for i in others)
            mean = sum(layout.record_bytes for layout in layouts) / num_layers
            text += (
                f"; other record sizes ({sizes} bytes), {dense / mean:.2f}x over all "
                f"{num_layers} layers"
            )
        if self.sparse_v:
            text += f"; sparse V: value tiles below {self.sparse_v:g} of the maximum skipped"
        if self.exact_window:
            w = self.exact_window
            text += (
                f"; exact window: each query's newest tokens (up to {w}) in the model dtype, "
                f"{w * dense} bytes per request per KV head and layer (a ring in vLLM's budget); "
                f"prefill chunks read as {self.window_prefill!r}"
            )
        return text


def _check_bits_field(value: Any, name: str) -> None:
    try:
        check_bits(value, name)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_mode_field(value: Any, name: str) -> None:
    if value not in MODES:
        raise ConfigError(f"{name} must be one of {MODES}, got {value!r}")


def _check_value_mode_field(value: Any, name: str) -> None:
    if value not in VALUE_MODES:
        raise ConfigError(f"{name} must be one of {VALUE_MODES}, got {value!r}")


def resolve_config_path(name: str) -> Path:
    """A file path, or the name of a preset in configs/ (with or without .yaml)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config: cannot read {name!r} (no such file, and no preset of that name)")


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"config: cannot read {str(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {str(path)!r} must hold a mapping of fields")
    return data


def _merge(base: dict[str, Any], extra: Mapping[str, Any], source: str) -> dict[str, Any]:
    known = {f.name for f in fields(TurboQuantConfig)} - {"source"}
    for key in extra:
        if key not in known:
            raise ConfigError(f"{source}: unknown field {key!r} (known: {sorted(known)})")
    merged = {**base, **extra}
    if "layers" in extra:
        merged["layers"] = {**base.get("layers", {}), **_layer_keys(extra["layers"], source)}
    return merged


def _layer_keys(layers: Any, source: str) -> dict[int, Any]:
    if not isinstance(layers, Mapping):
        raise ConfigError(f"{source}: layers must be a mapping of layer index to fields")
    out = {}
    for key, value in layers.items():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: layers key {key!r} is not a layer index") from None
    return out


def load_config(additional_config: Mapping[str, Any] | None = None) -> TurboQuantConfig:
    """The effective config from the default, TQ_VLLM_CONFIG and vLLM's additional_config."""
    sources = ["default"]
    data = _merge({}, read_config_file(CONFIG_DIR / "default.yaml"), "configs/default.yaml")
    env_path = os.environ.get(ENV_VAR)
    if env_path:
        path = resolve_config_path(env_path)
        data = _merge(data, read_config_file(path), f"{ENV_VAR}={env_path}")
        sources.append(str(path))
    section = (additional_config or {}).get("turboquant")
    if section is not None:
        if not isinstance(section, Mapping):
            raise ConfigError("additional_config.turboquant must be a mapping")
        section = dict(section)
        if "config" in section:
            path = resolve_config_path(str(section.pop("config")))
            data = _merge(data, read_config_file(path), str(path))
            sources.append(str(path))
        if section:
            data = _merge(data, section, "additional_config.turboquant")
            sources.append("inline")
    data["layers"] = _layer_keys(data.get("layers", {}), "config")
    return TurboQuantConfig(**data, source=" + ".join(sources))
