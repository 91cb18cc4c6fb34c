"""`tq-vllm eval`: quality of every KV-cache config on the embedded model, side by side.

Each config runs in its own process (one vLLM engine, freed when the process ends) with
chunked prefill in chunks of at most 128 tokens: every query of a chunk reads its keys and
values back from the compressed cache, its own chunk included (backend.py), so each predicted
token sees exactly what a decode step would. Measured per config:
  - perplexity from vLLM's prompt logprobs over 2K-token windows of pydoc_data/topics.py,
  - passkey retrieval: a 5-digit key planted at depths 0.1..0.9 of filler text, greedy answer,
  - KV capacity: the tokens vLLM fits in a fixed 1 GiB KV cache (what it really allocates),
and in this process, attention fidelity on the model's real post-RoPE keys and queries
(fidelity.py). Results go to a markdown table, a JSON file and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WINDOW = 2048  # tokens per perplexity window
CHUNK = 128  # max_num_batched_tokens: the largest prefill chunk
MAX_MODEL_LEN = 8192
KV_CACHE_BYTES = 1 << 30
LENGTHS = (1024, 2048, 4096, 7168)  # retrieval prompt lengths (tokens)
DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# The default config's promise (configs/default.yaml): at most this perplexity increase over
# bf16 on the full measurement. --quick reads a single 2K window, where the same config moves
# by more than on 50K tokens, hence its looser bound.
PROMISED_PPL_INCREASE = 0.01
QUICK_PPL_INCREASE = 0.02
FIDELITY_TOKENS = 2048


@dataclass(frozen=True)
class EvalConfig:
    name: str
    label: str  # what it is, for the table
    kv_cache_dtype: str = "turboquant"
    turboquant: dict[str, Any] | None = None  # additional_config["turboquant"]
    skip_layers: tuple[int, ...] = ()  # layers vLLM keeps in bf16 (--kv-cache-dtype-skip-layers)
    upstream: bool = False  # an emulation of upstream vLLM's presets

    @property
    def calibrated(self) -> bool:
        """Outlier channels: the run needs key_outlier_channels chosen on calibration text."""
        return bool((self.turboquant or {}).get("key_outlier_bits"))


def _tq(kb: int, vb: int, key_mode: str = "mse", value_mode: str = "mse", **extra: Any) -> dict:
    # Every field explicit: inline fields override configs/default.yaml key by key.
    fields = dict(key_bits=kb, value_bits=vb, key_mode=key_mode, value_mode=value_mode)
    return {**fields, "keep_first_layers": 0, "keep_last_layers": 0, **extra}


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
            f"K{b} V{b}, first/last 2 layers K8V8 (records padded)",
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
    return {c.name: c for c in configs}


FULL = list(all_configs())
QUICK = ["bf16", "default"]


# -- inputs (identical for every config) -------------------------------------------------------
def text_ids(tokenizer: Any) -> list[int]:
    import pydoc_data.topics as topics

    return tokenizer.encode("\n\n".join(topics.topics.values()))


def ppl_windows(ids: list[int], tokens: int) -> list[list[int]]:
    """Enough WINDOW-token windows to predict at least `tokens` tokens."""
    count = max(1, math.ceil(tokens / (WINDOW - 1)))
    if count * WINDOW > len(ids):
        raise ValueError(f"--tokens {tokens}: the text has only {len(ids)} tokens")
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(count)]


FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
HEADER = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the pass key.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompts(tokenizer: Any, lengths: tuple[int, ...], trials: int) -> list[dict]:
    """`trials` prompts per length, depths cycling through DEPTHS, keys from a fixed seed."""
    rng = random.Random(0)
    header, question = (
        tokenizer.encode(HEADER),
        tokenizer.encode(QUESTION, add_special_tokens=False),
    )
    unit = tokenizer.encode(FILLER, add_special_tokens=False)
    prompts = []
    for length in lengths:
        for t in range(trials):
            key = str(rng.randint(10000, 99999))
            needle = tokenizer.encode(
                f" The pass key is {key}. Remember it. {key} is the pass key.",
                add_special_tokens=False,
            )
            units = (length - len(header) - len(needle) - len(question)) // len(unit)
            depth = DEPTHS[t % len(DEPTHS)]
            before = round(depth * units)
            ids = header + unit * before + needle + unit * (units - before) + question
            prompts.append({"length": length, "depth": depth, "key": key, "ids": ids})
    return prompts


# -- one config, in its own process ------------------------------------------------------------
def engine(config: EvalConfig, chunk: int, channels: list | None = None) -> Any:
    from vllm import LLM

    from tq_vllm.model import ensure_default_model

    kwargs: dict[str, Any] = {}
    if config.turboquant is not None:
        kwargs["additional_config"] = {"turboquant": turboquant_fields(config, channels)}
    if config.skip_layers:
        kwargs["kv_cache_dtype_skip_layers"] = [str(i) for i in config.skip_layers]
    return LLM(
        model=str(ensure_default_model()),
        kv_cache_dtype=config.kv_cache_dtype,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enable_chunked_prefill=True,
        max_num_batched_tokens=chunk,
        # Prompt logprobs skip prefix-cache hits anyway; off, every prompt is computed.
        enable_prefix_caching=False,
        seed=0,
        **kwargs,
    )


def turboquant_fields(config: EvalConfig, channels: list | None) -> dict[str, Any]:
    """The config's additional_config["turboquant"], with its calibrated outlier channels."""
    if config.calibrated:
        return {**config.turboquant, "key_outlier_channels": channels}
    return dict(config.turboquant or {})


def measure_ppl(llm: Any, tokens: int) -> dict:
    from vllm import SamplingParams

    cache = llm.llm_engine.vllm_config.cache_config
    start = time.time()
    windows = ppl_windows(text_ids(llm.get_tokenizer()), tokens)
    outs = llm.generate(
        [{"prompt_token_ids": w} for w in windows],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    nll, count = 0.0, 0
    for window, out in zip(windows, outs, strict=True):
        for pos in range(1, len(window)):
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
    return {
        "ppl": math.exp(nll / count),
        "ppl_tokens": count,
        "kv_tokens": cache.num_gpu_blocks * cache.block_size,
        "ppl_seconds": time.time() - start,
    }


def measure_retrieval(llm: Any, trials: int, lengths: tuple[int, ...]) -> dict:
    from vllm import SamplingParams

    start = time.time()
    prompts = passkey_prompts(llm.get_tokenizer(), lengths, trials)
    outs = llm.generate(
        [{"prompt_token_ids": p["ids"]} for p in prompts],
        SamplingParams(max_tokens=8, temperature=0.0),
        use_tqdm=False,
    )
    retrieval: dict[str, list[int]] = {str(n): [] for n in lengths}
    for p, out in zip(prompts, outs, strict=True):
        retrieval[str(p["length"])].append(int(p["key"] in out.outputs[0].text))
    return {"retrieval": retrieval, "retrieval_seconds": time.time() - start}


def _worker(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    llm = engine(all_configs()[spec["config"]], spec["chunk"], spec.get("channels"))
    result = {}
    if "ppl" in spec["tasks"]:
        result.update(measure_ppl(llm, spec["tokens"]))
    if "retrieval" in spec["tasks"]:
        result.update(measure_retrieval(llm, spec["trials"], tuple(spec["lengths"])))
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_in_subprocess(spec: dict, log: Path) -> dict:
    """One measurement (spec: _worker's argument, less the result path) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        with log.open("w") as out:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tq_vllm.eval",
                    "--worker",
                    json.dumps({**spec, "result": str(result)}),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(f"{spec} failed (exit {proc.returncode}); log {log}:\n{tail}")
        return json.loads(result.read_text())


# -- bytes, fidelity, selection, report -----------------------------------------------------------
def layer_layouts(
    config: EvalConfig, head_dim: int, num_layers: int, channels: list | None = None
) -> list:
    """Each layer's record layout; None where the layer keeps bf16."""
    if config.kv_cache_dtype != "turboquant":
        return [None] * num_layers
    from tq_vllm.config import load_config

    fields = turboquant_fields(config, channels)
    layouts = load_config({"turboquant": fields}).layouts(head_dim, num_layers)
    return [None if i in config.skip_layers else lay for i, lay in enumerate(layouts)]


def bytes_per_token(layouts: list, head_dim: int, num_kv_heads: int) -> int:
    """K and V bytes one token occupies across all layers, padding included."""
    bf16 = 2 * head_dim * 2
    return num_kv_heads * sum(bf16 if lay is None else lay.record_bytes for lay in layouts)


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
    return max(ok, key=lambda r: (-r.bytes_per_token, -r.ppl), default=None)


def best_at(rows: list[Row], base: Row, capacity: float) -> Row | None:
    """Lowest perplexity among configs with at least `capacity` times bf16's capacity."""
    ok = [
        r
        for r in rows
        if r.ppl is not None and base.bytes_per_token >= capacity * r.bytes_per_token
    ]
    return min(ok, key=lambda r: r.ppl, default=None)


def markdown(rows: list[Row], base: Row, args: argparse.Namespace, notes: list[str]) -> str:
    lengths = list(base.retrieval)
    trials = len(base.retrieval[lengths[0]])
    head = (
        "| config | what | bytes/token | capacity vs bf16 | vLLM KV tokens | perplexity "
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
        f"{KV_CACHE_BYTES >> 30} GiB KV cache. '-': not measured (time budget). "
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
        lines.append(
            f"| {name} | {r.config.label} | {r.bytes_per_token:,} | "
            f"{base.bytes_per_token / r.bytes_per_token:.2f}x | {measured} | {acc} | "
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


def evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from tq_vllm.calibrate import calibrate_channels, calibration_ids
    from tq_vllm.config import resolve_config_path
    from tq_vllm.fidelity import capture, config_fidelity
    from tq_vllm.model import ensure_default_model

    # SIGTERM unwinds like Ctrl-C, so that the running engine process is killed with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    configs = all_configs()
    names = args.configs or (QUICK if args.quick else FULL)
    unknown = [n for n in [*names, *(args.retrieval_configs or [])] if n not in configs]
    if unknown:
        raise SystemExit(f"tq-vllm eval: unknown configs {unknown} (known: {list(configs)})")
    if "bf16" not in names:
        names = ["bf16", *names]
    tokens = args.tokens or (WINDOW - 1 if args.quick else 50_000)
    trials = args.trials or (2 if args.quick else 20)
    lengths = (LENGTHS[0],) if args.quick else tuple(args.lengths or LENGTHS)
    out = Path(args.out)
    runs = out / "quality_runs"
    runs.mkdir(parents=True, exist_ok=True)
    model = str(ensure_default_model())
    hf = AutoConfig.from_pretrained(model)
    head_dim = hf.hidden_size // hf.num_attention_heads
    num_layers, num_kv_heads = hf.num_hidden_layers, hf.num_key_value_heads

    tokenizer = AutoTokenizer.from_pretrained(model)
    args.fidelity_tokens = 512 if args.quick else FIDELITY_TOKENS
    channels = None  # outlier channels, chosen on the text just before the fidelity text
    if any(configs[n].calibrated for n in names):
        ids = calibration_ids(tokenizer, args.fidelity_tokens)
        channels = calibrate_channels(model, ids, head_dim // 4)

    ppl = dict(tasks=["ppl"], tokens=tokens, chunk=args.chunk)
    retrieval = dict(tasks=["retrieval"], trials=trials, lengths=list(lengths))
    picked = args.retrieval_configs
    with_retrieval = [n for n in names if picked is None or n == "bf16" or n in picked]
    if args.retrieval_chunk == args.chunk:  # one engine measures both
        both = {**ppl, **retrieval, "tasks": ["ppl", "retrieval"]}
        runs_todo = [(n, both if n in with_retrieval else ppl) for n in names]
    else:  # perplexity of every config first, then the (slower) passkey runs
        runs_todo = [(n, ppl) for n in names]
        runs_todo += [(n, {**retrieval, "chunk": args.retrieval_chunk}) for n in with_retrieval]
    results: dict[str, dict] = {name: {"retrieval": {}} for name in names}
    bar = tqdm(runs_todo, desc="tq-vllm eval", unit="run")
    deadline = time.time() + 60 * args.time_budget if args.time_budget is not None else None
    for name, spec in bar:
        spec = dict(config=name, **spec)
        if configs[name].calibrated:
            spec["channels"] = channels
        preset = (configs[name].turboquant or {}).get("config")
        if preset is not None:  # a config file: a cached run is reused only for the same text
            spec["config_text"] = resolve_config_path(preset).read_text()
        label = f"{name}.{'+'.join(spec['tasks'])}"
        bar.set_postfix_str(label)
        cached = runs / f"{label}.json"
        if args.reuse and cached.is_file():
            saved = json.loads(cached.read_text())
            if saved.pop("spec") == spec:
                results[name].update(saved)
                continue
        if deadline is not None and time.time() > deadline and name != "bf16":
            continue  # the row shows '-' for what this run would have measured
        result = run_in_subprocess(spec, runs / f"{label}.log")
        cached.write_text(json.dumps({**result, "spec": spec}, indent=1))
        results[name].update(result)

    bar = tqdm(total=len(names) + 1, desc="attention fidelity", unit="step")
    ids = text_ids(tokenizer)  # the end: text the perplexity windows never read
    cap = capture(model, ids[-args.fidelity_tokens :])
    bar.update()
    rows = []
    for name in names:
        config, res = configs[name], results[name]
        layouts = layer_layouts(config, head_dim, num_layers, channels)
        per_layer = config_fidelity(cap, layouts, seed=0, channels=channels)
        bar.update()
        worst = min(range(num_layers), key=lambda i: per_layer[i].cosine)
        rows.append(
            Row(
                config,
                bytes_per_token(layouts, head_dim, num_kv_heads),
                res.get("kv_tokens"),
                res.get("ppl"),
                res.get("ppl_tokens"),
                res["retrieval"],
                cosine_mean=sum(f.cosine for f in per_layer) / num_layers,
                cosine_worst=per_layer[worst].cosine,
                top1=sum(f.top1 for f in per_layer) / num_layers,
                top5=sum(f.top5 for f in per_layer) / num_layers,
                worst_layer=worst,
            )
        )
    bar.close()
    base = rows[0]
    bound = QUICK_PPL_INCREASE if args.quick else PROMISED_PPL_INCREASE
    chosen = choose_default(rows, base, PROMISED_PPL_INCREASE)
    best5 = best_at(rows, base, 5.0)
    notes = [
        f"Recommended default (highest capacity at <= +{PROMISED_PPL_INCREASE:.0%} perplexity "
        "and no passkey loss vs bf16 at any length): "
        + (
            f"**{chosen.config.name}** ({chosen.config.label}, "
            f"{base.bytes_per_token / chosen.bytes_per_token:.2f}x, "
            f"{chosen.ppl / base.ppl - 1:+.2%})"
            if chosen
            else "none of the configs run qualifies"
        ),
        "Best config at >= 5x capacity (lowest perplexity): "
        + (
            f"**{best5.config.name}** ({base.bytes_per_token / best5.bytes_per_token:.2f}x, "
            f"{best5.ppl / base.ppl - 1:+.1%})"
            if best5
            else "none of the configs run reaches 5x"
        ),
    ]
    args.command_line = "./tq.sh eval " + " ".join(args.argv)
    table = markdown(rows, base, args, notes)
    (out / "quality.md").write_text(table)
    (out / "quality.json").write_text(
        json.dumps([{**asdict(r), "config": asdict(r.config)} for r in rows], indent=1)
    )
    plot(rows, base, out / "quality.png", args.chunk)
    print(table)
    print(f"wrote {out / 'quality.md'}, {out / 'quality.json'}, {out / 'quality.png'}")
    if args.quick:
        default = next((r for r in rows if r.config.name == "default"), None)
        if default is not None:
            increase = default.ppl / base.ppl - 1
            if increase > bound:
                print(f"FAIL: default perplexity {increase:+.2%} over bf16 exceeds +{bound:.0%}")
                return 1
            if any((default.accuracy(n) or 0) < base.accuracy(n) for n in base.retrieval):
                print("FAIL: the default config loses passkey retrieval against bf16")
                return 1
            print(f"OK: default {increase:+.2%} over bf16 (bound +{bound:.0%}), retrieval kept")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, passkey retrieval, attention fidelity and "
        "capacity of every KV-cache config on the embedded model, side by side",
    )
    p.add_argument("configs", nargs="*", help=f"configs to run (default: all): {FULL}")
    p.add_argument("--tokens", type=int, help="predicted tokens for perplexity (default 50000)")
    p.add_argument("--trials", type=int, help="passkey trials per length (default 20)")
    p.add_argument("--lengths", type=int, nargs="+", help=f"passkey lengths (default {LENGTHS})")
    p.add_argument(
        "--quick",
        action="store_true",
        help="bf16 and default on one window, 2 "
        "passkey trials at 1K; fails unless default keeps its perplexity bound",
    )
    p.add_argument("--chunk", type=int, default=CHUNK, help="largest prefill chunk, perplexity")
    p.add_argument(
        "--retrieval-chunk", type=int, default=CHUNK, help="largest prefill chunk, passkey"
    )
    p.add_argument(
        "--retrieval-configs",
        nargs="+",
        help="run the passkey test only for these configs (default: all); bf16 always runs it",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="start no engine run after this many minutes; rows then show '-' for what was "
        "not measured (bf16, the reference, always runs)",
    )
    p.add_argument("--out", default="docs", help="folder for quality.md/.json/.png")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the results in OUT/quality_runs of runs with the same settings",
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("run through `tq-vllm eval`")
