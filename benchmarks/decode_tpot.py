"""Decode time per output token at long context through vllm.LLM: auto and TurboQuant configs.

Each measurement runs in a fresh process (one engine, eager mode): one prompt of C tokens of
real text (pydoc_data/topics.py) is prefilled once (the prefix cache keeps it), then timed
runs generate 1 token (t1, the best of 3: the prompt's last partial block and one step) and
N + 1 tokens; TPOT = (t(N + 1) - t1) / N is decode alone, repeated to give a median and a
minimum. Rounds interleave the configs, and each ratio is to auto in the same round, so a
machine whose speed drifts (shared CPUs) still gives comparable pairs. Past the embedded
model's 8,192 positions vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN opt-in is set: the speed is real,
the text is not.

    .venv/bin/python benchmarks/decode_tpot.py                       # auto vs default at 8K
    .venv/bin/python benchmarks/decode_tpot.py default --context 8000 16000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from offline_throughput import measure as run_worker

from tq_vllm.tools import machine

POSITIONS = 8192  # the embedded model's trained context


def worker(spec: dict) -> dict:
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
    tpots = [(run(n + 1) - first) / n for _ in range(spec["repeats"])]
    return {"tpots": tpots}


def measure(spec: dict) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")  # a 16K prefill step on 2 cores
    if spec["context"] + spec["tokens"] >= POSITIONS:
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    return run_worker(spec, __file__, env)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=["default"], help="TurboQuant presets")
    parser.add_argument("--context", type=int, nargs="+", default=[8000], help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dtype", help="model dtype (default: the CPU's best, see machine.py)")
    args = parser.parse_args(argv)
    dtype = args.dtype or machine.best_cpu_dtype()
    print(machine.describe(dtype))
    print(f"one prompt, {args.tokens} decode tokens x {args.repeats} timed runs, eager\n")
    print("| round | context | config | TPOT median ms | TPOT min ms | median vs auto |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in range(1, args.rounds + 1):
        for context in args.context:
            auto = None
            for config in ["auto", *args.configs]:
                spec = dict(config=config, context=context, dtype=dtype, tokens=args.tokens,
                            repeats=args.repeats)  # fmt: skip
                tpots = [t * 1e3 for t in measure(spec)["tpots"]]
                median = statistics.median(tpots)
                auto = median if config == "auto" else auto
                print(
                    f"| {r} | {context} | {config} | {median:.1f} | {min(tpots):.1f} | "
                    f"{median / auto:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
