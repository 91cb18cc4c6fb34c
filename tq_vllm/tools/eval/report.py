"""The eval's report: one row per config, the default chosen by the table's rule, the markdown
table and the plot."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tq_vllm.tools.eval.configs import EvalConfig
from tq_vllm.tools.eval.data import WINDOW
from tq_vllm.tools.eval.worker import KV_CACHE_BYTES

# The default config's promise (configs/default.yaml): at most this perplexity increase over
# bf16, on the full measurement and on --quick's single 2K window alike (the default measured
# +0.40% and +0.38% there, AMX Xeon, 2026-12-05).
PROMISED_PPL_INCREASE = 0.01


@dataclass
class Row:
    config: EvalConfig
    bytes_per_token: int
    kv_tokens: int | None  # None: no engine run for this config (time budget)
    ppl: float | None
    ppl_tokens: int | None
    retrieval: dict[str, list[int]]
    cosine_mean: float = 1.0
    cosine_worst: float = 1.0
    top1: float = 1.0
    top5: float = 1.0
    worst_layer: int = 0
    conversations: float | None = None  # vLLM's maximum concurrency, 2K-token requests

    def capacity(self, base: Row) -> float:
        """Capacity against bf16 (base): the ratio of vLLM's maximum concurrencies for
        2,048-token conversations where both ran (an exact window's rings included), else of
        the bytes per token."""
        if self.conversations and base.conversations:
            return self.conversations / base.conversations
        return base.bytes_per_token / self.bytes_per_token

    def accuracy(self, length: str) -> float | None:
        """Passkey accuracy at `length`; None where retrieval was not run for this config."""
        hits = self.retrieval.get(length)
        return sum(hits) / len(hits) if hits else None


def choose_default(rows: list[Row], base: Row, bound: float) -> Row | None:
    """Highest capacity with perplexity within `bound` of bf16 and no retrieval loss (configs
    whose retrieval was not measured do not qualify, nor do calibrated ones: their outlier
    channels belong to this model, the default serves any)."""
    ok = [
        r
        for r in rows
        if r.config.kv_cache_dtype == "turboquant"
        and not r.config.calibrated
        and r.ppl is not None
        and r.ppl <= base.ppl * (1 + bound)
        and r.retrieval
        and all((r.accuracy(n) or 0) >= base.accuracy(n) for n in base.retrieval)
    ]
    return max(ok, key=lambda r: (r.capacity(base), -r.ppl), default=None)


def best_at(rows: list[Row], base: Row, capacity: float) -> Row | None:
    """Lowest perplexity among configs with at least `capacity` times bf16's capacity."""
    ok = [r for r in rows if r.ppl is not None and r.capacity(base) >= capacity]
    return min(ok, key=lambda r: r.ppl, default=None)


def markdown(rows: list[Row], base: Row, args: argparse.Namespace, notes: list[str]) -> str:
    lengths = list(base.retrieval)
    trials = len(base.retrieval[lengths[0]])
    head = (
        "| config | what | bytes/token | capacity vs bf16 | 2K conversations vs bf16 "
        "| vLLM KV tokens | perplexity "
        "| vs bf16 | "
        + " | ".join(f"passkey {int(n) // 1024}K" for n in lengths)
        + " | score cos (mean / worst layer) | top-1 | top-5 |"
    )
    lines = [
        "# KV-cache quality on SmolLM2-135M-Instruct (vLLM engine, CPU)",
        "",
        "How it was measured (`tq-vllm eval`): a vLLM engine per config with chunked prefill; "
        "every query reads its keys and values back from the compressed cache, its own chunk "
        "included (the plugin stores a chunk before attending), so each predicted token attends "
        "through the compressed cache exactly as a decode step would, whatever the chunk size "
        "(on CPU the plugin dequantizes a chunk's cached keys and values to bf16 and runs vLLM's "
        "own CPU attention kernel over them, the kernel the bf16 row uses). "
        f"Perplexity: vLLM prompt logprobs over {base.ppl_tokens:,} predicted tokens of "
        f"pydoc_data/topics.py in {WINDOW}-token windows, prefill chunks of at most {args.chunk} "
        f"tokens. Passkey: a 5-digit key at depths 0.1..0.9 of filler text, greedy answer, "
        f"{trials} trials per length, prefill chunks of at most {args.retrieval_chunk} tokens "
        "('-': not run for that config). "
        "Bytes/token: K+V over all 30 layers from the record layout (padding included; "
        "bf16-kept layers at 256 bytes per head); capacity = bf16's bytes over the config's, "
        f"which is what vLLM allocates: vLLM KV tokens = tokens it fits in a "
        f"{KV_CACHE_BYTES >> 30} GiB KV cache. 2K conversations = vLLM's maximum concurrency for "
        "2,048-token requests in that cache over bf16's, every KV-cache group counted (an exact "
        "window's rings too); the default and the best config at 5x are chosen by it. "
        "'-': not measured (time budget). "
        "Fidelity: post-RoPE keys and queries captured from the model "
        f"(transformers) on {args.fidelity_tokens} tokens, keys quantized per layer, scores "
        "q.k_hat vs q.k over the causal prefix of 128 queries in the second half; cosine per "
        "query, top-1 = argmax unchanged, top-5 = overlap of the top-5 sets; mean over layers "
        "(worst layer for the cosine). Upstream rows (bold) emulate vLLM's turboquant_*bit_nc "
        "presets in this plugin.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        name = f"**{r.config.name}**" if r.config.upstream else r.config.name
        acc = " | ".join("-" if r.accuracy(n) is None else f"{r.accuracy(n):.0%}" for n in lengths)
        if r.ppl is None:
            measured = "- | - | -"
        else:
            measured = f"{r.kv_tokens:,} | {r.ppl:.3f} | {r.ppl / base.ppl - 1:+.1%}"
        talks = "-" if r.conversations is None else f"{r.capacity(base):.2f}x"
        lines.append(
            f"| {name} | {r.config.label} | {r.bytes_per_token:,} | "
            f"{base.bytes_per_token / r.bytes_per_token:.2f}x | {talks} | {measured} | {acc} | "
            f"{r.cosine_mean:.4f} / {r.cosine_worst:.4f} (L{r.worst_layer}) | "
            f"{r.top1:.1%} | {r.top5:.1%} |"
        )
    lines += ["", *notes, "", f"Command: `{args.command_line}`", ""]
    return "\n".join(lines)


def plot(rows: list[Row], base: Row, path: Path, chunk: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for r in [r for r in rows if r.ppl is not None]:
        x, y = r.bytes_per_token, 100 * (r.ppl / base.ppl - 1)
        style = dict(marker="*", s=180, color="tab:red") if r.config.upstream else dict(s=40)
        if r is base:
            style = dict(marker="s", s=60, color="black")
        ax.scatter([x], [y], zorder=3, **style)
        ax.annotate(r.config.name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_yscale("symlog", linthresh=1.0)  # linear within +-1 %, logarithmic beyond
    ax.axhline(100 * PROMISED_PPL_INCREASE, ls="--", lw=1, color="gray")  # the default's bound
    ax.set_xlabel("KV bytes per token (all layers, K+V)")
    ax.set_ylabel("perplexity increase over bf16 (%, symmetric log)")
    ax.set_title(
        f"SmolLM2-135M, vLLM, {chunk}-token prefill chunks (red stars: upstream emulation)"
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
