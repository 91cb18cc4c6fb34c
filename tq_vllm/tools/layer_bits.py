"""Bits per layer from measured sensitivity (`tq-vllm calibrate --layer-bits`).

Each layer's keys and values are quantized alone (every other layer exact) at a few bit widths
around the uniform config, in transformers on calibration text; the cost of a choice is the mean
KL divergence of the next-token distributions from the exact model's, over the second half of
the text (the longer prefixes). The allocation then spends the uniform config's bits where they
buy the most: every part (a layer's keys or its values) starts at its fewest bits, and one bit
at a time goes to the part whose KL falls most. Every step costs the same bytes (head_dim / 8 per
KV head), so the result stores exactly what the uniform config stores, with each layer at its
own record size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SPREAD = 2  # bit widths measured: the uniform config's, and up to this many fewer or more
PARTS = ("key", "value")


@dataclass(frozen=True)
class Allocation:
    key_bits: list[int]  # per layer
    value_bits: list[int]
    kl: float  # the summed single-part KLs of the allocation (the quantity it minimises)
    uniform_kl: float  # the same sum for the uniform config


def options(bits: int) -> range:
    return range(max(1, bits - SPREAD), min(8, bits + SPREAD) + 1)


def allocate(cost: dict[tuple[int, str, int], float], key_bits: int, value_bits: int) -> Allocation:
    """cost[(layer, part, bits)]: the KL with that part alone at those bits. Greedy by the
    largest drop per bit, within options(); the same total bits as the uniform config."""
    layers = sorted({layer for layer, _, _ in cost})
    uniform = {"key": key_bits, "value": value_bits}
    bits = {(layer, part): options(uniform[part])[0] for layer in layers for part in PARTS}
    budget = len(layers) * (key_bits + value_bits) - sum(bits.values())
    for _ in range(budget):
        steps = [
            (cost[(*part, b)] - cost[(*part, b + 1)], part)
            for part, b in bits.items()
            if b + 1 in options(uniform[part[1]])
        ]
        _, part = max(steps)
        bits[part] += 1
    return Allocation(
        [bits[(layer, "key")] for layer in layers],
        [bits[(layer, "value")] for layer in layers],
        sum(cost[(*part, b)] for part, b in bits.items()),
        sum(cost[(layer, part, uniform[part])] for layer in layers for part in PARTS),
    )


def measure_costs(
    model_path: str, ids: list[int], key_bits: int, value_bits: int, seed: int = 0
) -> dict[tuple[int, str, int], float]:
    """KL of the next-token distributions with one part of one layer quantized, for every layer,
    part and bit width in options(). The model runs once exactly; each measurement reruns only
    the layers from the quantized one on."""
    from tqdm import tqdm
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tq_vllm.tools.eval.fidelity import served_quantizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    target: dict[str, Any] = {}  # the layer, part and bits being measured

    def quantizing_attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == target.get("layer"):
            tq = served_quantizer(key.shape[-1], target["bits"], "mse", seed)
            if target["part"] == "key":
                key = tq.dequantize(tq.quantize(key, check=False)).to(key.dtype)
            else:
                value = tq.dequantize(tq.quantize(value, check=False)).to(value.dtype)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tq_vllm_layer_bits", quantizing_attention)
    model.config._attn_implementation = "tq_vllm_layer_bits"
    layers = model.model.layers
    inputs: list[tuple] = []  # each layer's (hidden states, keyword arguments)
    hooks = [
        layer.register_forward_pre_hook(
            lambda _, args, kwargs: inputs.append((args[0], kwargs)), with_kwargs=True
        )
        for layer in layers
    ]
    for layer in layers:
        layer.self_attn.config._attn_implementation = "tq_vllm_layer_bits"
    scored = slice(len(ids) // 2, None)  # the predictions with the longer prefixes
    with torch.no_grad():
        # No KV cache: the reruns must not append to it (attention would read the exact keys).
        exact = model(torch.tensor([ids]), use_cache=False).logits[0, scored].log_softmax(-1)
    for hook in hooks:
        hook.remove()
    cost = {}
    uniform = {"key": key_bits, "value": value_bits}
    runs = [
        (index, part, bits)
        for index in range(len(layers))
        for part in PARTS
        for bits in options(uniform[part])
    ]
    with torch.no_grad():
        for index, part, bits in tqdm(runs, desc="layer sensitivity", unit="run"):
            target.update(layer=index, part=part, bits=bits)
            hidden = inputs[index][0]
            for layer, (_, kwargs) in zip(layers[index:], inputs[index:]):
                hidden = layer(hidden, **kwargs)
            cost[(index, part, bits)] = kl_divergence(model, hidden[0, scored], exact)
    return cost


def kl_divergence(model: Any, hidden: torch.Tensor, exact: torch.Tensor, rows: int = 64) -> float:
    """Mean KL(exact || the model's prediction from `hidden` [N, hidden]), `rows` predictions at
    a time: vocabulary-wide temporaries stay small enough to be reused rather than mapped anew."""
    total = 0.0
    for start in range(0, hidden.shape[0], rows):
        logits = model.lm_head(model.model.norm(hidden[start : start + rows])).log_softmax(-1)
        log_p = exact[start : start + rows]
        total += (log_p.exp() * (log_p - logits)).sum().item()
    return total / hidden.shape[0]
