"""`tq-vllm calibrate`: choose each layer's outlier key channels, or with --layer-bits each
layer's key and value bits (tools/layer_bits.py), on real text; write a config.

Outlier channels (quant/outliers.py) belong to one model: per attention layer and KV head, the n key
channels of largest mean square over calibration text, measured on the post-RoPE keys that
attention sees (captured in transformers, fidelity.capture). The written config serves that
model only: the plugin refuses it at startup for a model with other layer or KV-head counts.
The default text is the stretch of Python's pydoc topics just before the eval's fidelity text
(its end), which the eval's perplexity windows never read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

CALIBRATION_TOKENS = 2048
LAYER_BITS_TOKENS = 1024


def calibration_ids(tokenizer: Any, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """`tokens` ids of pydoc topics, ending `tokens` ids before the end of the text."""
    from tq_vllm.tools.eval.data import text_ids

    return text_ids(tokenizer)[-2 * tokens : -tokens]


def calibrate_channels(model_path: str, ids: list[int], count: int) -> list[list[list[int]]]:
    """[layer][kv_head] -> the `count` key channels of largest mean square, ascending."""
    from tq_vllm.tools.eval.fidelity import capture, outlier_channels

    top = outlier_channels(capture(model_path, ids), count)
    return [layer.sort(dim=-1).values.tolist() for layer in top]


def write_config(path: Path, fields: dict[str, Any], about: str) -> None:
    lines = [f"# {line}" for line in about.splitlines()]
    body = yaml.safe_dump(fields, default_flow_style=None, sort_keys=False)
    path.write_text("\n".join(lines) + "\n" + body)


def outlier_fields(
    model: str, ids: list[int], bits: tuple[int, int, int], count: int, head_dim: int
) -> tuple:
    """(config fields, a description) of `count` outlier key channels per layer and KV head;
    bits = (regular key channels, outlier channels, values)."""
    from tq_vllm.plugin.config import LayerBits

    key_bits, outlier_bits, value_bits = bits
    fields = dict(
        key_bits=key_bits,
        value_bits=value_bits,
        key_mode="mse",
        key_outlier_bits=outlier_bits,
        key_outlier_channels=calibrate_channels(model, ids, count),
    )
    layout = LayerBits(key_bits, value_bits, "mse", "mse", count, outlier_bits).layout(head_dim)
    about = (
        f"Keys K{layout.key_rate:g}: per layer and KV head, {count} of {head_dim} key channels "
        f"(the largest mean square)\nat {outlier_bits} bits, the rest at {key_bits}; values "
        f"{value_bits} bits."
    )
    return fields, about


def layer_bits_fields(model: str, ids: list[int], key_bits: int, value_bits: int) -> tuple:
    """(config fields, a description) of the sensitivity-driven allocation at the bytes of
    uniform K`key_bits` V`value_bits`."""
    from tq_vllm.tools.layer_bits import allocate, measure_costs

    plan = allocate(measure_costs(model, ids, key_bits, value_bits), key_bits, value_bits)
    layers = {
        i: {"key_bits": kb, "value_bits": vb}
        for i, (kb, vb) in enumerate(zip(plan.key_bits, plan.value_bits))
        if (kb, vb) != (key_bits, value_bits)
    }
    fields = dict(key_bits=key_bits, value_bits=value_bits, key_mode="mse", layers=layers)
    about = (
        f"Bits per layer at the bytes of uniform K{key_bits} V{value_bits}: keys "
        f"{plan.key_bits}, values {plan.value_bits}.\nSummed single-layer KL from the exact "
        f"model: {plan.kl:.4f} (uniform: {plan.uniform_kl:.4f})."
    )
    return fields, about


def calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from transformers import AutoConfig, AutoTokenizer

    from tq_vllm.plugin.config import ConfigError, load_config
    from tq_vllm.tools.model import MODEL_NAME, ensure_default_model

    if args.layer_bits and args.channels:
        raise SystemExit("tq-vllm calibrate: --channels sets outlier channels, which --layer-bits "
                         "does not use")  # fmt: skip
    key_bits = args.key_bits or (4 if args.layer_bits else 2)
    value_bits = args.value_bits or (4 if args.layer_bits else 3)
    tokens = args.tokens or (LAYER_BITS_TOKENS if args.layer_bits else CALIBRATION_TOKENS)
    try:  # the bits, checked before minutes of measuring
        load_config({"turboquant": {"key_bits": key_bits, "value_bits": value_bits}})
    except ConfigError as err:
        raise SystemExit(f"tq-vllm calibrate: {err}") from None
    model = args.model or str(ensure_default_model())
    model_name = args.model or f"{MODEL_NAME}, the embedded model"
    hf = AutoConfig.from_pretrained(model)
    num_layers = hf.num_hidden_layers
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    count = args.channels or head_dim // 4
    tokenizer = AutoTokenizer.from_pretrained(model)
    if args.text:
        ids = tokenizer.encode(Path(args.text).read_text())[:tokens]
        source = args.text
    else:
        ids = calibration_ids(tokenizer, tokens)
        source = "Python's pydoc_data/topics.py"
    if args.layer_bits:
        fields, about = layer_bits_fields(model, ids, key_bits, value_bits)
    else:
        bits = (key_bits, args.outlier_bits, value_bits)
        fields, about = outlier_fields(model, ids, bits, count, head_dim)
    # Calibrated for records alone: the default's exact window would put a ring's block
    # beside every request (and give layers of different sizes one page each).
    fields = {**fields, "exact_window": 0}
    config = replace(load_config({"turboquant": fields}), source=args.out)
    about += (
        f" Written by `tq-vllm calibrate`\nfor {model_name} ({num_layers} layers) from "
        f"{len(ids)} tokens of {source}.\n" + config.describe(head_dim, num_layers)
    )
    write_config(Path(args.out), fields, about)
    print(about)
    print(f"wrote {args.out}; serve it with TQ_VLLM_CONFIG={args.out} or --additional-config")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose outlier key channels (fractional key rates such as 2.5 bits), or with "
        "--layer-bits each layer's bits, on calibration text and write a config",
    )
    p.add_argument("out", help="the config file to write (YAML)")
    p.add_argument("--model", help="model path (default: the embedded SmolLM2-135M)")
    p.add_argument(
        "--layer-bits",
        action="store_true",
        help="choose each layer's key and value bits by measured sensitivity, storing what "
        "uniform --key-bits/--value-bits store (default K4 V4), instead of outlier channels",
    )
    p.add_argument(
        "--key-bits",
        type=int,
        help="bits of the regular key channels (default 2; 4 with --layer-bits)",
    )
    p.add_argument("--outlier-bits", type=int, default=4, help="bits of the outlier channels")
    p.add_argument("--value-bits", type=int, help="default 3; 4 with --layer-bits")
    p.add_argument(
        "--channels", type=int, help="outlier channels per KV head (default: head_dim / 4)"
    )
    p.add_argument("--text", help="a text file to calibrate on (default: pydoc topics)")
    p.add_argument(
        "--tokens",
        type=int,
        help=f"calibration tokens (default {CALIBRATION_TOKENS}; {LAYER_BITS_TOKENS} with "
        "--layer-bits, which reruns the model about 10 times per layer)",
    )
