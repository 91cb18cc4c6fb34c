"""`tq-vllm eval`: run every config (worker.py), measure fidelity here, write the report."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tq_vllm.tools.eval.configs import (
    FULL,
    QUICK,
    all_configs,
    bytes_per_token,
    file_config,
    layer_layouts,
)
from tq_vllm.tools.eval.data import LENGTHS, WINDOW, text_ids
from tq_vllm.tools.eval.report import (
    PROMISED_PPL_INCREASE,
    Row,
    best_at,
    choose_default,
    markdown,
    plot,
)
from tq_vllm.tools.eval.worker import CHUNK, run_in_subprocess

FIDELITY_TOKENS = 2048


def evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from tq_vllm.plugin.config import resolve_config_path
    from tq_vllm.tools.calibrate import calibrate_channels, calibration_ids
    from tq_vllm.tools.eval.fidelity import capture, config_fidelity
    from tq_vllm.tools.model import ensure_default_model

    # SIGTERM unwinds like Ctrl-C, so that the running engine process is killed with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    configs = all_configs()
    files = {}  # name -> a config file given on the command line
    names = []
    for name in args.configs or (QUICK if args.quick else FULL):
        if name not in configs and Path(name).suffix in (".yaml", ".yml"):
            config = file_config(name)
            if config.name in configs:
                raise SystemExit(f"tq-vllm eval: {name} is named like the config {config.name!r}")
            configs[config.name], files[config.name] = config, name
            name = config.name
        names.append(name)
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
    reused: list[str] = []  # runs taken from OUT/quality_runs, not measured now
    bar = tqdm(runs_todo, desc="tq-vllm eval", unit="run")
    deadline = time.time() + 60 * args.time_budget if args.time_budget is not None else None
    for name, spec in bar:
        spec = dict(config=name, **spec)
        if name in files:
            spec["file"] = files[name]
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
                reused.append(label)
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
                conversations=res.get("conversations"),
            )
        )
    bar.close()
    base = rows[0]
    chosen = choose_default(rows, base, PROMISED_PPL_INCREASE)
    best5 = best_at(rows, base, 5.0)
    notes = [
        f"Recommended default (highest capacity at <= +{PROMISED_PPL_INCREASE:.0%} perplexity "
        "and no passkey loss vs bf16 at any length): "
        + (
            f"**{chosen.config.name}** ({chosen.config.label}, "
            f"{chosen.capacity(base):.2f}x, "
            f"{chosen.ppl / base.ppl - 1:+.2%})"
            if chosen
            else "none of the configs run qualifies"
        ),
        "Best config at >= 5x capacity (lowest perplexity): "
        + (
            f"**{best5.config.name}** ({best5.capacity(base):.2f}x, "
            f"{best5.ppl / base.ppl - 1:+.1%})"
            if best5
            else "none of the configs run reaches 5x"
        ),
    ]
    if reused:
        notes.append(
            "Runs reused from earlier run files (--reuse: same settings, measured by an earlier "
            "command, possibly on another machine or version): " + ", ".join(reused)
        )
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
            bound = PROMISED_PPL_INCREASE
            if increase > bound:
                print(f"FAIL: default perplexity {increase:+.2%} over bf16 exceeds +{bound:.0%}")
                return 1
            if any((default.accuracy(n) or 0) < base.accuracy(n) for n in base.retrieval):
                print("FAIL: the default config loses passkey retrieval against bf16")
                return 1
            print(f"OK: default {increase:+.2%} over bf16 (bound +{bound:.0%}), retrieval kept")
    return 0


def positive_minutes(text: str) -> float:
    """--time-budget's type: 0 or less would run nothing after bf16, never what is meant."""
    minutes = float(text)
    if not minutes > 0:
        raise argparse.ArgumentTypeError(
            f"must be more than 0 minutes, got {text} (leave the flag out for no limit)"
        )
    return minutes


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, passkey retrieval, attention fidelity and "
        "capacity of every KV-cache config on the embedded model, side by side",
    )
    p.add_argument(
        "configs", nargs="*", help=f"configs to run (default: all): {FULL}, or config files (.yaml)"
    )
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
        type=positive_minutes,
        metavar="MINUTES",
        help="start no engine run after this many minutes; rows then show '-' for what was "
        "not measured (bf16, the reference, always runs; leave it out for no limit)",
    )
    p.add_argument("--out", default="docs", help="folder for quality.md/.json/.png")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the results in OUT/quality_runs of runs with the same settings",
    )
