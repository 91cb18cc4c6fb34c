"""Attention fidelity on the model's real keys and queries.

The embedded model runs once in Hugging Face transformers with an attention function that
records each layer's post-RoPE queries and keys (what attention really sees); each config then
quantizes the keys with its own per-layer quantizer and the estimated scores q . k_hat are
compared with the exact q . k over the causal prefix of every sampled query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tq_vllm.layout import RecordLayout
from tq_vllm.quantizer import TurboQuantizer


@dataclass
class Capture:
    queries: list[torch.Tensor]  # per layer, float32 [Hq, L, d]
    keys: list[torch.Tensor]  # per layer, float32 [Hk, L, d]


def capture(model_path: str, ids: list[int]) -> Capture:
    """Post-RoPE queries and keys of every attention layer for one sequence of token ids."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    queries: list[torch.Tensor | None] = [None] * num_layers
    keys: list[torch.Tensor | None] = [None] * num_layers

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        queries[module.layer_idx] = query[0].detach().float().clone()
        keys[module.layer_idx] = key[0].detach().float().clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("tq_vllm_capture", recording_attention)
    model.config._attn_implementation = "tq_vllm_capture"
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = "tq_vllm_capture"
    with torch.no_grad():
        model(torch.tensor([ids]))
    if any(q is None for q in queries):
        raise RuntimeError("the capture hook did not see every attention layer")
    return Capture(queries, keys)  # type: ignore[arg-type]


@dataclass
class LayerFidelity:
    cosine: float  # mean over sampled queries of cos(estimated scores, exact scores)
    top1: float  # fraction of queries whose argmax key is unchanged
    top5: float  # mean |top-5(estimated) & top-5(exact)| / 5


def layer_fidelity(
    q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor, rows: torch.Tensor
) -> LayerFidelity:
    """q [Hq, L, d], k and k_hat [Hk, L, d]; rows: the query positions to compare (>= 5)."""
    hq, hk = q.shape[0], k.shape[0]
    qs = q[:, rows].reshape(hk, (hq // hk) * len(rows), -1)
    exact = (qs @ k.transpose(1, 2)).reshape(hq, len(rows), -1)
    est = (qs @ k_hat.transpose(1, 2)).reshape(hq, len(rows), -1)
    future = torch.arange(k.shape[1]) > rows[:, None]  # [R, L]
    cos = torch.nn.functional.cosine_similarity(
        est.masked_fill(future, 0.0), exact.masked_fill(future, 0.0), dim=-1
    )
    est, exact = est.masked_fill(future, float("-inf")), exact.masked_fill(future, float("-inf"))
    top1 = (est.argmax(-1) == exact.argmax(-1)).float().mean()
    t_est, t_exact = est.topk(5, dim=-1).indices, exact.topk(5, dim=-1).indices
    overlap = (t_est.unsqueeze(-1) == t_exact.unsqueeze(-2)).any(-1).float().sum(-1) / 5
    return LayerFidelity(cos.mean().item(), top1.item(), overlap.mean().item())


def config_fidelity(
    cap: Capture,
    layouts: list[RecordLayout | None],
    seed: int,
    num_queries: int = 256,
) -> list[LayerFidelity]:
    """Per-layer fidelity; layouts[i] None: layer i keeps exact keys (bf16 / skipped layers).
    Queries are sampled evenly from the second half of the sequence (long prefixes)."""
    length = cap.keys[0].shape[1]
    rows = torch.linspace(length // 2, length - 1, num_queries).long().unique()
    out = []
    for q, k, layout in zip(cap.queries, cap.keys, layouts, strict=True):
        if layout is None:
            k_hat = k
        else:
            key = TurboQuantizer(layout.head_dim, layout.key_bits, layout.key_mode, seed)
            k_hat = key.dequantize(key.quantize(k, check=False)).float()
        out.append(layer_fidelity(q, k, k_hat, rows))
    return out
