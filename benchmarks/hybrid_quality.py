"""Perplexity and capacity of a hybrid model, its sliding-window layers skipped or compressed.

No trained hybrid checkpoint is at hand offline, so the model is a stand-in: the embedded
SmolLM2-135M with 3 of every 4 layers given a sliding window (`layer_types` and
`sliding_window` in its config.json, which vLLM's Llama honours), the same weights. It has not
been trained with the window, so its bf16 perplexity is above the full-attention model's (both
are printed); what the table compares is each KV config against bf16 on the same stand-in.

Each row is one vLLM engine in its own process (the eval's worker): perplexity from prompt logprobs
over the eval's text in 2,048-token windows, prefill chunks of 128, a 1 GiB KV cache, and the
capacity as vLLM reports it (KV cache size; maximum concurrency for 8,192-token requests).

    .venv/bin/python benchmarks/hybrid_quality.py                     # default and k4v4
    .venv/bin/python benchmarks/hybrid_quality.py k3v3 --tokens 50000 --window 1024
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from tq_vllm.tools.eval.worker import CHUNK, MAX_MODEL_LEN, run_in_subprocess
from tq_vllm.tools.model import ensure_default_model
from tq_vllm.tools.server import kv_cache_tokens

CONCURRENCY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def windowed_model(out: Path, window: int, global_every: int = 4) -> Path:
    """The embedded model's files (linked) with every layer but each `global_every`-th one
    given a `window`-token sliding window."""
    source = ensure_default_model()
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    config = json.loads((source / "config.json").read_text())
    config["layer_types"] = [
        "full_attention" if i % global_every == global_every - 1 else "sliding_attention"
        for i in range(config["num_hidden_layers"])
    ]
    config["sliding_window"] = window
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def measure(name: str, config: str, model: Path, tokens: int, logs: Path, skip: bool) -> dict:
    spec = dict(config=config, tasks=["ppl"], tokens=tokens, chunk=CHUNK, model=str(model))
    if skip:
        spec["skip_layers"] = ["sliding_window"]
    log = logs / f"{name}.log"
    result = run_in_subprocess(spec, log)
    text = log.read_text()
    found = CONCURRENCY.search(text)
    if found is None or int(found.group(1).replace(",", "")) != MAX_MODEL_LEN:
        raise RuntimeError(f"vLLM reported no concurrency for {MAX_MODEL_LEN} tokens in {log}")
    return {**result, "vllm_tokens": kv_cache_tokens(text), "concurrency": float(found.group(2))}


def rows_for(configs: list[str]) -> list[tuple[str, str, str, bool]]:
    """(row name, eval config, model, sliding layers skipped) for each measurement."""
    rows = [("bf16, full attention", "bf16", "full", False), ("bf16", "bf16", "hybrid", False)]
    for c in configs:
        rows.append((f"{c}, sliding skipped", c, "hybrid", True))
        rows.append((f"{c}, all compressed", c, "hybrid", False))
    return rows


def table(results: dict[str, dict], window: int) -> str:
    base = results["bf16"]
    lines = [
        f"| SmolLM2 stand-in, 3 of 4 layers windowed ({window} tokens) | vLLM KV tokens "
        f"| max concurrency at {MAX_MODEL_LEN:,} tokens | vs bf16 | perplexity | vs bf16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['vllm_tokens']:,} | {r['concurrency']:.2f}x "
            f"| {r['concurrency'] / base['concurrency']:.2f}x | {r['ppl']:.3f} "
            f"| {r['ppl'] / base['ppl'] - 1:+.2%} |"
        )
    lines.append(f"\n{base['ppl_tokens']:,} predicted tokens per row.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="*", default=["default", "k4v4"], help="eval configs")
    p.add_argument("--tokens", type=int, default=8188, help="predicted tokens per row")
    p.add_argument("--window", type=int, default=512, help="the sliding layers' window")
    p.add_argument("--out", type=Path, help="folder for the engine logs (default: a temp one)")
    args = p.parse_args()
    if args.window < 1:
        p.error(f"--window must be at least 1 token, got {args.window}")
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.out or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        hybrid = windowed_model(Path(tmp) / "hybrid", args.window)
        models = {"full": ensure_default_model(), "hybrid": hybrid}
        results = {}
        for name, config, model, skip in rows_for(args.configs):
            results[name] = measure(name, config, models[model], args.tokens, logs, skip)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(table(results, args.window))


if __name__ == "__main__":
    main()
