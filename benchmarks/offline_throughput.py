"""Offline throughput through vllm.LLM: bf16 (auto) and TurboQuant configs, paired.

Each config gets its own process (one engine, eager mode, a fixed KV budget, no prefix cache so
that every run prefills): N sequences of real text (pydoc_data/topics.py) with P-token prompts,
greedy, exactly O output tokens each, submitted at once. Output tokens/s covers prefill and
decode, as a user sees it. The engines stay up side by side and take turns (paired.py): run i
of every config comes seconds from run i of auto, so on a machine whose speed drifts (shared
CPUs) each ratio is a pair measured on the same machine state; the table gives each config's
median tokens/s, the median of its ratios to auto (their range) and in how many pairs it was
faster. Rounds start fresh engines. (Before 2026-12-06 each measurement was one fresh process,
its engine core in a second one.)

    .venv/bin/python benchmarks/offline_throughput.py                  # auto vs default
    .venv/bin/python benchmarks/offline_throughput.py default k2v2 --repeats 8 --prompt 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import paired

from tq_vllm.tools import machine


def prepare(spec: dict) -> Callable[[], float]:
    """The engine, warmed up; returns a function timing one run's output tokens/s."""
    import pydoc_data.topics as topics

    from vllm import LLM, SamplingParams

    from tq_vllm.tools.model import ensure_default_model

    config = spec["config"]
    kwargs = {}
    if config != "auto":
        kwargs["additional_config"] = {"turboquant": {"config": config}}
    llm = LLM(
        model=str(ensure_default_model()),
        kv_cache_dtype="auto" if config == "auto" else "turboquant",
        enforce_eager=True,
        max_model_len=spec["prompt"] + spec["output"],
        kv_cache_memory_bytes=spec["kv_bytes"],
        enable_prefix_caching=False,  # every run prefills its prompts
        dtype=spec["dtype"],
        seed=0,
        **kwargs,
    )
    ids = llm.get_tokenizer().encode("\n\n".join(topics.topics.values()))
    stride = (len(ids) - spec["prompt"]) // spec["seqs"]
    prompts = [
        {"prompt_token_ids": ids[i * stride : i * stride + spec["prompt"]]}
        for i in range(spec["seqs"])
    ]
    greedy = SamplingParams(temperature=0, max_tokens=spec["output"], ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up

    def run() -> float:
        start = time.perf_counter()
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        seconds = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / seconds

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=["default"], help="TurboQuant presets")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence")
    parser.add_argument("--output", type=int, default=128, help="output tokens per sequence")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs per config")
    parser.add_argument("--rounds", type=int, default=1, help="fresh engines per round")
    parser.add_argument("--kv-bytes", type=int, default=1 << 29, help="KV cache budget")
    parser.add_argument("--dtype", help="model dtype (default: the CPU's best, see machine.py)")
    args = parser.parse_args(argv)
    dtype = args.dtype or machine.best_cpu_dtype()
    base = dict(seqs=args.seqs, prompt=args.prompt, output=args.output, kv_bytes=args.kv_bytes)
    base["dtype"] = dtype
    print(machine.describe(dtype))
    print(
        f"{args.seqs} sequences x {args.prompt}-token prompts, {args.output} output tokens, "
        f"KV budget {args.kv_bytes / 2**20:.0f} MiB, eager, {args.repeats} timed runs per "
        "config, the configs' runs alternating\n"
    )
    print("| round | config | output tok/s, median | ratio to auto, median (range) | faster |")
    print("|---:|---|---:|---|---:|")
    configs = ["auto", *dict.fromkeys(c for c in args.configs if c != "auto")]
    for r in range(1, args.rounds + 1):
        rates = paired.alternate(__file__, configs, base, args.repeats)
        cells = paired.ratio_cells(rates, lower_is_better=False)
        for config, values in rates.items():
            median = statistics.median(values)
            print(f"| {r} | {config} | {median:.1f} | {cells[config]} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        paired.serve(prepare(json.loads(sys.argv[2])))
    else:
        main()
