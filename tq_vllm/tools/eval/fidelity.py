"""Attention fidelity on the model's real keys and queries.

The embedded model runs once in Hugging Face transformers with an attention function that
records each layer's post-RoPE queries and keys (what attention really sees); each config then
quantizes the keys with its own per-layer quantizer and the estimated scores q . k_hat are
compared with the exact q . k over the causal prefix of every sampled query.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from tq_vllm.quant.outliers import SplitKeyQuantizer
from tq_vllm.quant.quantizer import SERVED_GAIN, TurboQuantizer
from tq_vllm.record.layout import RecordLayout


@dataclass
class Capture:
    queries: list[torch.Tensor]  # per layer, float32 [Hq, L, d]
    keys: list[torch.Tensor]  # per layer, float32 [Hk, L, d]
    exact: dict[tuple, torch.Tensor] = field(default_factory=dict)  # (layer, rows) -> scores

    def scores(self, layer: int, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """q . keys for the query positions `rows`: [Hq, R, L]."""
        q = self.queries[layer]
        hq, hk = q.shape[0], keys.shape[0]
        qs = q[:, rows].reshape(hk, (hq // hk) * len(rows), -1)
        return (qs @ keys.transpose(1, 2)).reshape(hq, len(rows), -1)

    def exact_scores(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        key = (layer, tuple(rows.tolist()))
        if key not in self.exact:  # every config compares against the same exact scores
            self.exact[key] = self.scores(layer, self.keys[layer], rows)
        return self.exact[key]


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


def outlier_channels(cap: Capture, count: int) -> list[torch.Tensor]:
    """Per layer, each KV head's `count` key channels of largest mean square: [Hk, count]."""
    return [(k**2).mean(dim=1).topk(count, dim=-1).indices for k in cap.keys]


@functools.cache
def served_quantizer(head_dim: int, bits: int, mode: str, seed: int) -> TurboQuantizer:
    return TurboQuantizer(head_dim, bits, mode, seed, gain=SERVED_GAIN)  # as served


@dataclass
class LayerFidelity:
    cosine: float  # mean over sampled queries of cos(estimated scores, exact scores)
    top1: float  # fraction of queries whose argmax key is unchanged
    top5: float  # mean |top-5(estimated) & top-5(exact)| / 5


def score_fidelity(exact: torch.Tensor, est: torch.Tensor, rows: torch.Tensor) -> LayerFidelity:
    """Exact and estimated scores [H, R, L] of the queries at positions `rows` (each >= 4)."""
    future = torch.arange(exact.shape[-1]) > rows[:, None]  # [R, L]
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
    num_queries: int = 128,
    channels: list | None = None,
) -> list[LayerFidelity]:
    """Per-layer fidelity; layouts[i] None: layer i keeps exact keys (bf16 / skipped layers);
    channels[i]: layer i's outlier channels [Hk][n], for layouts with split keys.
    Queries are sampled evenly from the second half of the sequence (long prefixes)."""
    length = cap.keys[0].shape[1]
    rows = torch.linspace(length // 2, length - 1, num_queries).long().unique()
    out = []
    for layer, layout in enumerate(layouts):
        if layout is None:
            out.append(LayerFidelity(1.0, 1.0, 1.0))
            continue
        if layout.split_keys:
            chosen = torch.tensor(channels[layer])
            key = SplitKeyQuantizer(
                layout.head_dim, layout.key_bits, layout.key_outlier_bits, chosen, seed
            )
            keys = cap.keys[layer].transpose(0, 1)  # [L, Hk, d]: heads next to channels
            k_hat = key.dequantize(key.quantize(keys)).transpose(0, 1)
        else:
            key = served_quantizer(layout.head_dim, layout.key_bits, layout.key_mode, seed)
            k_hat = key.dequantize(key.quantize(cap.keys[layer], check=False)).float()
        est = cap.scores(layer, k_hat, rows)
        out.append(score_fidelity(cap.exact_scores(layer, rows), est, rows))
    return out
