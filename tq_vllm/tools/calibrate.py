"""`tq-vllm calibrate`: choose each layer's outlier key channels on real text, write a config.

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


def calibration_ids(tokenizer: Any, tokens: int = CALIBRATION_TOKENS) -> list[int]:
    """`tokens` ids of pydoc topics, ending `tokens` ids before the end of the text."""
    from tq_vllm.tools.eval.data import text_ids

    return text_ids(tokenizer)[-2 * tokens : -tokens]


def calibrate_channels(model_path: str, ids: list[int], count: int) -> list[list[list[int]]]:
    """[layer][kv_head] -> the `count` key channels of largest mean square, ascending."""
    from tq_vllm.tools.eval.fidelity import capture, outlier_channels

    top = outlier_channels(capture(model_path, ids), count)
    return [layer.sort(dim=-1).values.tolist() for layer in top]


def write_config(
    path: Path, fields: dict[str, Any], channels: list[list[list[int]]], about: str
) -> None:
    lines = [f"# {line}" for line in about.splitlines()]
    body = yaml.safe_dump({**fields, "key_outlier_channels": channels}, default_flow_style=None)
    path.write_text("\n".join(lines) + "\n" + body)


def calibrate(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from tq_vllm.plugin.config import TurboQuantConfig
    from tq_vllm.tools.model import MODEL_NAME, ensure_default_model

    model = args.model or str(ensure_default_model())
    model_name = args.model or f"{MODEL_NAME}, the embedded model"
    hf = AutoConfig.from_pretrained(model)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    count = args.channels or head_dim // 4
    tokenizer = AutoTokenizer.from_pretrained(model)
    if args.text:
        ids = tokenizer.encode(Path(args.text).read_text())[: args.tokens]
        source = args.text
    else:
        ids = calibration_ids(tokenizer, args.tokens)
        source = "Python's pydoc_data/topics.py"
    fields = dict(
        key_bits=args.key_bits,
        value_bits=args.value_bits,
        key_mode="mse",
        key_outlier_bits=args.outlier_bits,
    )
    channels = calibrate_channels(model, ids, count)
    config = TurboQuantConfig(**fields, key_outlier_channels=channels, source=args.out)
    num_layers = len(channels)
    rate = config.layouts(head_dim, num_layers)[0].key_rate
    about = (
        f"Keys K{rate:g}: per layer and KV head, {count} of {head_dim} key channels (the "
        f"largest mean square)\nat {args.outlier_bits} bits, the rest at {args.key_bits}; "
        f"values {args.value_bits} bits. Written by `tq-vllm calibrate`\nfor {model_name} "
        f"({num_layers} layers) from {len(ids)} tokens of {source}.\n"
        + config.describe(head_dim, num_layers)
    )
    write_config(Path(args.out), fields, channels, about)
    print(about)
    print(f"wrote {args.out}; serve it with TQ_VLLM_CONFIG={args.out} or --additional-config")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help="choose outlier key channels on calibration text and write a config "
        "(fractional key rates such as 2.5 bits)",
    )
    p.add_argument("out", help="the config file to write (YAML)")
    p.add_argument("--model", help="model path (default: the embedded SmolLM2-135M)")
    p.add_argument("--key-bits", type=int, default=2, help="bits of the regular key channels")
    p.add_argument("--outlier-bits", type=int, default=4, help="bits of the outlier channels")
    p.add_argument("--value-bits", type=int, default=3)
    p.add_argument(
        "--channels", type=int, help="outlier channels per KV head (default: head_dim / 4)"
    )
    p.add_argument("--text", help="a text file to calibrate on (default: pydoc topics)")
    p.add_argument("--tokens", type=int, default=CALIBRATION_TOKENS, help="calibration tokens")
