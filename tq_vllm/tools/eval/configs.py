"""The eval's KV-cache configs, and the bytes each one stores per token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EvalConfig:
    name: str
    label: str  # what it is, for the table
    kv_cache_dtype: str = "turboquant"
    turboquant: dict[str, Any] | None = None  # additional_config["turboquant"]
    # Layers vLLM keeps in bf16 (--kv-cache-dtype-skip-layers): indices, or kinds of layer
    skip_layers: tuple[int | str, ...] = ()
    upstream: bool = False  # an emulation of upstream vLLM's presets

    @property
    def calibrated(self) -> bool:
        """Outlier channels: the run needs key_outlier_channels chosen on calibration text."""
        return bool((self.turboquant or {}).get("key_outlier_bits"))


def _tq(kb: int, vb: int, key_mode: str = "mse", value_mode: str = "mse", **extra: Any) -> dict:
    # Every field explicit: inline fields override configs/default.yaml key by key (its exact
    # window included).
    fields = dict(key_bits=kb, value_bits=vb, key_mode=key_mode, value_mode=value_mode)
    return {**fields, "keep_first_layers": 0, "keep_last_layers": 0, "exact_window": 0, **extra}


def all_configs(num_layers: int = 30) -> dict[str, EvalConfig]:
    edges = (0, 1, num_layers - 2, num_layers - 1)
    configs = [
        EvalConfig("bf16", "bf16 (vLLM auto)", "auto"),
        EvalConfig("default", "configs/default.yaml", turboquant={"config": "default"}),
    ]
    configs += [
        EvalConfig(f"k{kb}v{vb}", f"K{kb} V{vb} mse", turboquant=_tq(kb, vb))
        for kb in (2, 3, 4)
        for vb in (2, 3, 4)
    ]
    configs += [
        EvalConfig(f"k{b}v{b}-prod", f"K{b} V{b}, prod keys", turboquant=_tq(b, b, "prod"))
        for b in (2, 3, 4)
    ]
    configs += [
        EvalConfig(f"k{kb}v{vb}", f"K{kb} V{vb} mse", turboquant=_tq(kb, vb))
        for kb, vb in ((5, 3), (5, 4), (6, 3), (6, 4), (6, 5), (7, 4), (8, 4))
    ]
    configs += [
        EvalConfig(
            f"k{b}v{b}-edge8",
            f"K{b} V{b}, first/last 2 layers K8V8",
            turboquant=_tq(b, b, keep_first_layers=2, keep_last_layers=2),
        )
        for b in (3, 4)
    ]
    configs += [
        EvalConfig(
            f"k{b}v{b}-edgebf16",
            f"K{b} V{b}, first/last 2 layers bf16 (skip layers)",
            turboquant=_tq(b, b),
            skip_layers=edges,
        )
        for b in (3, 4)
    ]
    configs += [
        EvalConfig(
            f"upstream-{b}bit-nc",
            f"upstream turboquant_{b}bit_nc emulation: K{b} Lloyd-Max + NC, V{b} uniform, "
            "first/last 2 layers bf16",
            turboquant=_tq(b, b, value_mode="uniform"),
            skip_layers=edges,
            upstream=True,
        )
        for b in (3, 4)
    ]
    configs += [
        EvalConfig(
            f"k{kb}.5v{vb}-outliers",
            f"K{kb}.5: 1/4 of key channels (calibrated outliers) at {kb + 2} bits, the rest at "
            f"{kb}; V{vb} mse",
            turboquant=_tq(kb, vb, key_outlier_bits=kb + 2),
        )
        for kb, vb in ((2, 2), (2, 3), (3, 3), (3, 4), (5, 4))
    ]
    configs += [
        EvalConfig(
            f"default-sparse{t:g}",
            f"configs/default.yaml, sparse V at {t:g} (fused kernels only: prefill chunks "
            "under 16 rows, decode)",
            turboquant={"config": "default", "sparse_v": t},
        )
        for t in (1e-3, 1e-2)
    ]
    # The exact window (each query's newest tokens in bf16, ExactRule): W 32 where a ring fits in
    # a 128-token block of records (>= 64 bytes per token per head), W 16 below.
    configs += [
        EvalConfig(
            f"{name}-w{w}",
            f"{label}, exact window {w}",
            turboquant={**fields, "exact_window": w},
        )
        for name, label, fields, w in (
            ("k6v5", "K6 V5 mse", _tq(6, 5), 32),
            ("k6v4", "K6 V4 mse", _tq(6, 4), 32),
            ("k5v4", "K5 V4 mse", _tq(5, 4), 32),
            ("k5v3", "K5 V3 mse", _tq(5, 3), 32),
            ("k4v4", "K4 V4 mse", _tq(4, 4), 32),
            ("k4v4", "K4 V4 mse", _tq(4, 4), 16),
            ("k4v3", "K4 V3 mse", _tq(4, 3), 16),
            ("k3v3", "K3 V3 mse", _tq(3, 3), 16),
        )
    ]
    return {c.name: c for c in configs}


def file_config(path: str) -> EvalConfig:
    """A config file (e.g. written by `tq-vllm calibrate`), named by its stem."""
    return EvalConfig(Path(path).stem, path, turboquant={"config": str(Path(path).resolve())})


FULL = list(all_configs())
QUICK = ["bf16", "default"]


def turboquant_fields(config: EvalConfig, channels: list | None) -> dict[str, Any]:
    """The config's additional_config["turboquant"], with its calibrated outlier channels.
    Prefill rows read as decode rows do (window_prefill "decode"): each token is scored as it
    would be generated, whatever the eval's chunking."""
    fields = {**(config.turboquant or {}), "window_prefill": "decode"}
    if config.calibrated:
        fields["key_outlier_channels"] = channels
    return fields


def layer_layouts(
    config: EvalConfig, head_dim: int, num_layers: int, channels: list | None = None
) -> list:
    """Each layer's record layout; None where the layer keeps bf16."""
    if config.kv_cache_dtype != "turboquant":
        return [None] * num_layers
    from tq_vllm.plugin.config import load_config

    fields = turboquant_fields(config, channels)
    layouts = load_config({"turboquant": fields}).layouts(head_dim, num_layers)
    return [None if i in config.skip_layers else lay for i, lay in enumerate(layouts)]


def bytes_per_token(layouts: list, head_dim: int, num_kv_heads: int) -> int:
    """K and V bytes one token occupies across all layers, padding included."""
    bf16 = 2 * head_dim * 2
    return num_kv_heads * sum(bf16 if lay is None else lay.record_bytes for lay in layouts)
