"""Offline throughput through vllm.LLM: bf16 (auto) and TurboQuant configs, back to back.

Each measurement runs in a fresh process (one engine, eager mode, a fixed KV budget): N
sequences of real text (pydoc_data/topics.py) with P-token prompts, greedy, exactly O output
tokens each, submitted at once. Output tokens/s covers prefill and decode, as a user sees it.
Rounds interleave the configs, and each ratio is to auto in the same round, so a machine whose
speed drifts (shared CPUs) still gives comparable pairs.

    .venv/bin/python benchmarks/offline_throughput.py                  # auto vs default, 2 rounds
    .venv/bin/python benchmarks/offline_throughput.py default k2v2 --rounds 3 --prompt 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from tq_vllm.tools import machine


def worker(spec: dict) -> dict:
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
    start = time.perf_counter()
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds}


def measure(spec: dict, script: str = __file__, env: dict | None = None) -> dict:
    """The RESULT line of `script --worker spec`, run in a fresh process (one engine)."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['config']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", default=["default"], help="TurboQuant presets")
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per sequence")
    parser.add_argument("--output", type=int, default=128, help="output tokens per sequence")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=1 << 29, help="KV cache budget")
    parser.add_argument("--dtype", help="model dtype (default: the CPU's best, see machine.py)")
    args = parser.parse_args(argv)
    dtype = args.dtype or machine.best_cpu_dtype()
    base = dict(seqs=args.seqs, prompt=args.prompt, output=args.output, kv_bytes=args.kv_bytes)
    base["dtype"] = dtype
    print(machine.describe(dtype))
    print(
        f"{args.seqs} sequences x {args.prompt}-token prompts, {args.output} output tokens, "
        f"KV budget {args.kv_bytes / 2**20:.0f} MiB, eager\n"
    )
    print("| round | config | output tok/s | vs auto |")
    print("|---:|---|---:|---:|")
    for r in range(1, args.rounds + 1):
        auto = None
        for config in ["auto", *args.configs]:
            res = measure({**base, "config": config})
            rate = res["tokens"] / res["seconds"]
            auto = rate if config == "auto" else auto
            print(f"| {r} | {config} | {rate:.1f} | {rate / auto:.2f}x |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
