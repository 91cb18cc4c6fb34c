"""The C++ CPU ops (store/store.cpp, decode/attention.cpp, context/dequantize.cpp, with the
shared csrc/*.h): built once, loaded into torch.ops.tq_vllm_cpu.

The extension is compiled at first use with torch.utils.cpp_extension into the tq_vllm cache
directory, keyed by the sources, torch version and CPU (it is built with -march=native);
cpp_extension's lock file lets concurrent processes share one build. If it cannot be built,
available() logs why once and returns False, and dispatch.py keeps the PyTorch reference.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

from tq_vllm.quant.centroids import cache_dir
from tq_vllm.record.codec import LayerCodec

logger = logging.getLogger("tq_vllm")
HERE = Path(__file__).parent
SOURCES = [HERE / "store" / "store.cpp", HERE / "decode" / "attention.cpp",
           HERE / "context" / "dequantize.cpp"]  # fmt: skip
HEADERS = [HERE / "csrc" / "records.h", HERE / "decode" / "attention_math.h"]


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_directory() -> Path:
    key = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    key += f"{torch.__version__}|{platform.machine()}|{_cpu_fingerprint()}".encode()
    return cache_dir() / "extensions" / f"cpu_ops-{hashlib.sha256(key).hexdigest()[:16]}"


@functools.cache
def available() -> bool:
    """Builds (or loads the cached build of) the extension once per process."""
    try:
        from torch.utils import cpp_extension

        build = build_directory()
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="tq_vllm_cpu_ops",
            sources=[str(path) for path in SOURCES],
            build_directory=str(build),
            extra_cflags=["-O3", "-march=native"],
            is_python_module=False,
        )
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


def layout_fields(codec: LayerCodec) -> list[int]:
    """The record layout as the C++ ops take it (records.h's struct Layout)."""
    return list(codec.layout.kernel_fields())


def key_centroids(codec: LayerCodec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The key centroids as the C++ ops take them: for split keys the regular part's and the
    outlier part's, for plain keys (centroids, None)."""
    if not codec.layout.split_keys:
        return codec.key.centroids.float().contiguous(), None
    regular, outlier = codec.key.regular.centroids, codec.key.outlier.centroids
    return regular.float().contiguous(), outlier.float().contiguous()
