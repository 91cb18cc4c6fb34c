"""Compile the served Triton kernels for NVIDIA GPUs on a machine without one.

`python -m tq_vllm.tools.cuda_compile [--arch 90 80] [--json]` calls the real kernel wrappers
(store, decode, context) on CPU tensors for a covering set of variants, records each kernel
launch instead of running it, and compiles it with Triton for sm_90 / sm_80 (Triton's wheel
ships the assembler). Per variant it reports registers, spills (local memory), shared memory
against the chip's limit, and the SASS size, from the cubin itself (cuobjdump). Needs torch and
triton only; TRITON_INTERPRET must be unset (the interpreter does not compile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Shared memory per block a kernel may use (opt-in maximum), per compute capability.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TRITON_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclass(frozen=True)
class Variant:
    head_dim: int
    key_bits: int
    key_mode: str
    value_bits: int
    dtype: str  # the model's (query, key, value) dtype
    block_size: int
    key_outliers: int = 0  # split keys: outlier channels per KV head, at key_outlier_bits
    key_outlier_bits: int = 0
    sparse_v: float = 0.0  # the attention kernels' sparse-V threshold (0: off)
    sliding_window: int | None = None  # a local layer's window (None: global attention)

    @property
    def name(self) -> str:
        split = f"+{self.key_outliers}x{self.key_outlier_bits}" if self.key_outliers else ""
        sparse = f" sparse{self.sparse_v:g}" if self.sparse_v else ""
        window = f" window{self.sliding_window}" if self.sliding_window else ""
        return (
            f"d{self.head_dim} K{self.key_bits}{split}{self.key_mode} V{self.value_bits} "
            f"{self.dtype} bs{self.block_size}{sparse}{window}"
        )


# Every key and value width 1..8 at least once, both key modes, fp16 and bf16, the three head
# dims, vLLM's CUDA block sizes; the embedded model's default first.
VARIANTS = [
    Variant(64, 6, "mse", 5, "bfloat16", 16),
    Variant(128, 4, "mse", 4, "float16", 16),
    Variant(128, 3, "prod", 3, "bfloat16", 32),
    Variant(256, 2, "mse", 8, "bfloat16", 16),
    Variant(256, 8, "prod", 1, "float16", 16),
    Variant(64, 1, "prod", 2, "float16", 64),
    Variant(128, 5, "mse", 6, "bfloat16", 16),
    Variant(128, 7, "mse", 7, "float16", 32),
    # Split keys: the K2.5 V3 preset's shape, and parts that end inside an 8-index group.
    Variant(64, 2, "mse", 3, "bfloat16", 16, key_outliers=16, key_outlier_bits=4),
    Variant(128, 3, "mse", 4, "float16", 32, key_outliers=40, key_outlier_bits=6),
    # sparse V's tile skip and a local layer's window
    Variant(128, 4, "mse", 4, "float16", 16, sparse_v=1e-3, sliding_window=512),
]


@dataclass
class Compiled:
    kernel: str
    variant: str
    arch: int
    num_warps: int
    registers: int
    spill_bytes: int  # local memory per thread: register spills (and stack)
    shared_bytes: int  # static + dynamic
    shared_limit: int
    sass_lines: int
    triton: str  # the Triton version that compiled it

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes per thread")
        if self.shared_bytes > self.shared_limit:
            found.append(f"needs {self.shared_bytes} bytes of shared memory > {self.shared_limit}")
        return found


def record_launches(variant: Variant) -> list[tuple[str, Any, tuple, dict]]:
    """(what, kernel, args, kwargs) of every launch the wrappers make for this variant."""
    from tq_vllm.kernels.context.triton_context import context_attention
    from tq_vllm.kernels.decode.triton_decode import decode_attention
    from tq_vllm.kernels.store.triton_store import store_kv
    from tq_vllm.kernels.window.exact import ExactRule
    from tq_vllm.record.codec import LayerCodec
    from tq_vllm.record.layout import RecordLayout

    v = variant
    dtype = getattr(torch, v.dtype)
    hk, group = 2, 4
    layout = RecordLayout(
        v.head_dim, v.key_bits, v.key_mode, v.value_bits,
        key_outliers=v.key_outliers, key_outlier_bits=v.key_outlier_bits,
    )  # fmt: skip
    channels = torch.arange(v.key_outliers).repeat(hk, 1) if v.key_outliers else None
    codec = LayerCodec(layout, seed=0, outlier_channels=channels)
    cache = torch.zeros(8, hk, v.block_size, codec.layout.record_bytes, dtype=torch.uint8)
    table = torch.zeros(2, 4, dtype=torch.int32)
    lens = torch.tensor([3 * v.block_size, 20], dtype=torch.int32)
    query = torch.zeros(2, hk * group, v.head_dim, dtype=dtype)
    key = torch.zeros(2, hk, v.head_dim, dtype=dtype)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    sparse = {"sparse_v": v.sparse_v, "sliding_window": v.sliding_window}
    calls = {
        "store": lambda: store_kv(key, key, cache, torch.tensor([1, 2]), codec),
        "decode": lambda: decode_attention(
            query, cache, table, lens, codec, 0.1, num_splits=3, **sparse
        ),
        # The register codebook (kept behind decode_attention's switch until measured).
        "decode (registers)": lambda: decode_attention(
            query, cache, table, lens, codec, 0.1, num_splits=3, **sparse, codebook="registers"
        ),
        # The exact window's compressed part: the reduce kernel writes each row's lse too.
        "decode (lse)": lambda: decode_attention(
            query,
            cache,
            table,
            lens,
            codec,
            0.1,
            num_splits=3,
            **sparse,
            lse_out=torch.empty(2, hk * group),
        ),  # fmt: skip
        "context (cached)": lambda: context_attention(
            query, None, None, cache, table, qsl, lens, codec, 0.1, max_query_len=1, **sparse
        ),
        "context (fresh)": lambda: context_attention(
            query, key, key, cache, table, qsl, lens, codec, 0.1, max_query_len=1, **sparse
        ),
        # The exact window's prefill chunks: compressed positions before the exact ones, lse.
        "context (window)": lambda: context_attention(
            query,
            None,
            None,
            cache,
            table,
            qsl,
            lens,
            codec,
            0.1,
            max_query_len=1,
            sparse_v=v.sparse_v,
            exact_rule=ExactRule(window=32, anchor=128),
            lse_out=torch.empty(2, hk * group),
        ),
    }
    return record_calls(calls)


def record_calls(calls: dict[str, Any]) -> list[tuple[str, Any, tuple, dict]]:
    """Run each call with Triton's launcher replaced by a recorder: (name, kernel, args,
    kwargs) of every launch, nothing run."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((what, self, args, kwargs))

    JITFunction.run = record
    try:
        for what, call in calls.items():  # noqa: B007 - record() reads `what`
            call()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(kernel: Any, args: tuple, kwargs: dict, arch: int) -> dict[str, Any]:
    """Registers, spills, shared memory and SASS size of one recorded launch."""
    compiled, usage, sass = build(kernel, args, kwargs, arch)
    return dict(
        num_warps=compiled.metadata.num_warps,
        registers=usage["REG"],
        spill_bytes=usage["LOCAL"] + usage["STACK"],
        shared_bytes=usage["SHARED"] + compiled.metadata.shared,
        sass_lines=len(sass_instructions(sass)),
    )


def build(kernel: Any, args: tuple, kwargs: dict, arch: int) -> tuple[Any, dict[str, int], str]:
    """Compile one recorded launch for sm_<arch>: (Triton's compiled kernel, cuobjdump's
    resource usage (REG, STACK, SHARED, LOCAL, ...), the SASS listing)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    values = dict(zip(kernel.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in kernel.arg_names})
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
    source = ASTSource(kernel, signature, constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return (compiled, *_cubin_facts(compiled.asm["cubin"]))


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, instruction) of every line of a cuobjdump SASS listing."""
    found = re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass, re.M)
    return [(int(address, 16), text) for address, text in found]


def _cubin_facts(cubin: bytes) -> tuple[dict[str, int], str]:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    line = next(x for x in usage.stdout.splitlines() if "REG:" in x)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}, sass.stdout


def compile_variant(variant: Variant, arch: int) -> list[Compiled]:
    import triton

    done, results = set(), []
    for what, kernel, args, kwargs in record_launches(variant):
        name = f"{what}: {kernel.__name__}"
        key = (kernel.__name__, repr(sorted(kwargs.items())))  # the reduce kernel repeats
        if key in done:
            continue
        done.add(key)
        facts = compile_launch(kernel, args, kwargs, arch)
        results.append(
            Compiled(
                name, variant.name, arch, shared_limit=SHARED_LIMIT[arch],
                triton=triton.__version__, **facts,
            )
        )  # fmt: skip
    return results


def compile_all(archs: list[int], jobs: int) -> list[Compiled]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("cuda_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    todo = [(v, arch) for arch in archs for v in (VARIANTS if arch == 90 else VARIANTS[:3])]
    with ProcessPoolExecutor(jobs) as pool:
        return [c for part in pool.map(compile_variant, *zip(*todo)) for c in part]


def table(results: list[Compiled]) -> str:
    lines = [
        "| arch | variant | kernel | warps | registers | spill B | shared KiB (limit) | SASS |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        shared = f"{r.shared_bytes / 1024:.1f} ({r.shared_limit // 1024})"
        lines.append(
            f"| sm_{r.arch} | {r.variant} | {r.kernel} | {r.num_warps} | {r.registers} | "
            f"{r.spill_bytes} | {shared} | {r.sass_lines} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT)
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.jobs)
    if args.json:
        print(json.dumps([{**asdict(r), "problems": r.problems} for r in results]))
    else:
        print(table(results))
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
