"""The C++ CPU ops (store/store.cpp, decode/attention.cpp, context/dequantize.cpp,
window/exact.cpp, window/decode_step.cpp, with the shared csrc/*.h): built once per ISA
variant, the best one this CPU runs chosen at load time.

Variants (VARIANTS): the same sources compiled for AVX-512 with BF16, AVX-512, AVX2 + FMA
(x86-64-v3) and the compiler's portable baseline. Each registers its ops under its own
namespace (torch.ops.tq_vllm_cpu_<variant>), so one process can load several (the tests compare
them); ops() hands out the chosen one. A build goes to the tq_vllm cache directory keyed by
what it contains (sources, torch version, variant), never by the machine that compiled it, so
the cache can be shared between hosts. TQ_VLLM_CPU_ISA forces a variant (it must run here).
cpp_extension's lock file lets concurrent processes share one build. On Linux the builds use
OpenMP through torch's own libgomp, so at::parallel_for runs on the threads vLLM gives torch.
If the chosen variant cannot be built, available() logs why once and returns False, and
dispatch.py keeps the PyTorch reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Any, NamedTuple

import torch

from tq_vllm.kernels.common import per_codec
from tq_vllm.quant.centroids import cache_dir
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout

logger = logging.getLogger("tq_vllm")
HERE = Path(__file__).parent
SOURCES = [HERE / "store" / "store.cpp", HERE / "decode" / "attention.cpp",
           HERE / "context" / "dequantize.cpp", HERE / "window" / "exact.cpp",
           HERE / "window" / "decode_step.cpp"]  # fmt: skip
HEADERS = [
    HERE / "csrc" / "ops.h",
    HERE / "csrc" / "records.h",
    HERE / "csrc" / "float_rows.h",
    HERE / "csrc" / "byte_planes.h",
    HERE / "csrc" / "row_decoder.h",
    HERE / "csrc" / "split_row_decoder.h",
    *(HERE / "decode" / name for name in ("attention_math.h", "bf16_dots.h", "dots.h")),
    HERE / "store" / "row_indexer.h",
]
ISA_ENV = "TQ_VLLM_CPU_ISA"
# Threads for at::parallel_for need OpenMP in our build: on Linux (gcc, torch's libgomp); Apple's
# clang has no -fopenmp, so there the ops stay on one thread.
OPENMP = platform.system() == "Linux"


# Best first: (name, compiler flags, /proc/cpuinfo flags the code then needs). The AVX-512
# paths need VBMI (byte permutes decode the packed indices); BF16 adds the bf16 conversions.
VARIANTS: list[tuple[str, list[str], set[str]]] = [
    (
        "avx512_bf16",
        ["-march=x86-64-v4", "-mavx512vbmi", "-mavx512bf16"],
        {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vbmi",
         "avx512_bf16", "avx2", "fma"},
    ),
    (
        "avx512",
        ["-march=x86-64-v4", "-mavx512vbmi"],
        {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vbmi", "avx2",
         "fma"},
    ),
    ("avx2", ["-march=x86-64-v3"], {"avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"}),
    ("portable", [], set()),
]  # fmt: skip


@functools.cache  # ops() asks on every kernel call: read /proc/cpuinfo once per process
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def runnable_variants() -> list[str]:
    """The variants this CPU executes, best first ("portable" always)."""
    return list(_runnable(platform.machine(), frozenset(cpu_flags())))


@functools.cache  # ops() asks on every kernel call
def _runnable(machine: str, flags: frozenset[str]) -> tuple[str, ...]:
    if machine not in ("x86_64", "AMD64"):
        return ("portable",)
    return tuple(name for name, _, needs in VARIANTS if needs <= flags)


def chosen_variant() -> str:
    return _chosen(os.environ.get(ISA_ENV))


@functools.cache  # ops() asks on every kernel call (4 per layer and decode step)
def _chosen(forced: str | None) -> str:
    runnable = runnable_variants()
    if forced is None:
        return runnable[0]
    if forced not in runnable:
        names = [name for name, _, _ in VARIANTS]
        why = "unknown" if forced not in names else "not executable on this CPU"
        raise ValueError(f"{ISA_ENV}={forced!r}: {why} (this CPU runs {runnable})")
    return forced


def namespace(variant: str) -> str:
    return f"tq_vllm_cpu_{variant}"


def build_directory(variant: str) -> Path:
    key = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    key += f"{torch.__version__}|{platform.machine()}|{_flags(variant)}|{_link_flags()}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    return cache_dir() / "extensions" / f"cpu_ops-{variant}-{digest}"


def _flags(variant: str) -> list[str]:
    flags = next(flags for name, flags, _ in VARIANTS if name == variant)
    # Hidden symbols: variants loaded side by side never resolve each other's functions.
    # -fopenmp: at::parallel_for is inlined into our code and runs serially unless _OPENMP is
    # defined here (the ops ran on one thread until 2026-12-03).
    openmp = ["-fopenmp"] if OPENMP else []
    return ["-O3", "-fvisibility=hidden", *openmp, f"-DTQ_OPS={namespace(variant)}", *flags]


def _link_flags() -> list[str]:
    """Link against the OpenMP runtime torch ships and loads (torch/lib/libgomp*.so*, under a
    hashed name in some wheels), so the process keeps one runtime and our parallel regions run
    on the threads vLLM binds; -fopenmp (the compiler's libgomp) only where torch has none."""
    if not OPENMP:
        return []
    lib = Path(torch.__file__).parent / "lib"
    bundled = sorted(lib.glob("libgomp*.so*"))
    return [str(bundled[0]), f"-Wl,-rpath,{lib}"] if bundled else ["-fopenmp"]


@functools.cache
def load(variant: str) -> Any:
    """Builds (or loads the cached build of) one variant; its torch.ops namespace."""
    from torch.utils import cpp_extension

    build = build_directory(variant)
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"tq_vllm_cpu_ops_{variant}",
        sources=[str(path) for path in SOURCES],
        build_directory=str(build),
        extra_cflags=_flags(variant),
        extra_ldflags=_link_flags(),
        is_python_module=False,
    )
    return getattr(torch.ops, namespace(variant))


@functools.cache
def available() -> bool:
    """Loads the chosen variant once per process; False (logged) if it cannot be built."""
    try:
        variant = chosen_variant()
        load(variant)
        logger.info("C++ CPU kernels: the %s build (this CPU runs %s)", variant,
                    ", ".join(runnable_variants()))  # fmt: skip
        return True
    except Exception as e:  # noqa: BLE001 - any build failure means: use the reference
        lines = str(e).strip().splitlines() or [""]
        # The compiler's first "error:" line says most; cpp_extension wraps it in its log.
        reason = next((line for line in lines if "error:" in line), lines[-1])
        logger.warning(
            "the C++ CPU kernels could not be built (%s: %s); using the PyTorch "
            "reference instead (correct, slower)",
            type(e).__name__,
            reason.strip(),
        )
        return False


def ops() -> Any:
    """The chosen variant's ops (call after available() returned True)."""
    return load(chosen_variant())


def layout_fields(codec: LayerCodec) -> tuple[int, ...]:
    """The record layout as the C++ ops take it (records.h's struct Layout)."""
    return _kernel_fields(codec.layout)


@functools.cache  # asked per layer and step: building the tuple took 6 us
def _kernel_fields(layout: RecordLayout) -> tuple[int, ...]:
    return layout.kernel_fields()


class Codebooks(NamedTuple):
    """A codec's centroids, record layout and rotation as the C++ ops take them: for split
    keys the regular part's key centroids and the outlier part's, for plain keys (centroids,
    None); value centroids, or for uniform values the levels 0 .. 2^b - 1 (scaled and shifted
    per vector)."""

    key: torch.Tensor
    outlier: torch.Tensor | None
    value: torch.Tensor
    layout: tuple[int, ...]
    rotation_t: torch.Tensor  # R^T, with which the attention op rotates queries


def codebooks(codec: LayerCodec) -> Codebooks:
    return per_codec(codec, "cpu codebooks", _codebooks)  # asked per layer and step


def _codebooks(codec: LayerCodec) -> Codebooks:
    def floats(t: torch.Tensor) -> torch.Tensor:
        return t.float().contiguous()

    key = codec.key
    regular, outlier = (key.regular, key.outlier) if codec.layout.split_keys else (key, None)
    bits = codec.layout.value_bits
    uniform = torch.arange(1 << bits, dtype=torch.float32) if codec.layout.uniform_values else None
    return Codebooks(
        floats(regular.centroids),
        None if outlier is None else floats(outlier.centroids),
        floats(codec.value.centroids) if uniform is None else uniform,
        layout_fields(codec),
        floats(codec.rotation.T),
    )
