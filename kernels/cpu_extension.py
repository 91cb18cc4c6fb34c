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
SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_directory() -> Path:
    key = SOURCE.read_bytes() + f"{torch.__version__}|{platform.machine()}|".encode()
    digest = hashlib.sha256(key + _cpu_fingerprint().encode()).hexdigest()[:16]
    return cache_dir() / "extensions" / f"cpu_attention-{digest}"


@functools.cache
def available() -> bool:
    """Builds (or loads the cached build of) the extension once per process."""
    try:
        from torch.utils import cpp_extension

        build = build_directory()
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="tq_vllm_cpu_attention",
            sources=[str(SOURCE)],
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
            "the fused CPU attention kernel could not be built (%s: %s); using the PyTorch "
            "reference instead (correct, slower)",
            type(e).__name__,
            reason.strip(),
        )
        return False


def layout_fields(codec: LayerCodec) -> list[int]:
    """The record layout as the C++ ops take it (the store appends the residual norm's offset)."""
    layout = codec.layout
    return [
        layout.key_index_bits,
        int(layout.prod),
        layout.value_bits,
        layout.value_norm,
        layout.key_indices,
        layout.key_signs,
        layout.value_indices,
    ]


def key_args(codec: LayerCodec) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(key centroids, outlier centroids, outlier fields) as the C++ ops take them: for split
    keys the regular part's centroids, then the outlier part's, and its [count, bits, norm
    offset, indices offset]; for plain keys (centroids, None, [])."""
    layout = codec.layout
    if not layout.split_keys:
        return codec.key.centroids.float().contiguous(), None, []
    fields = [
        layout.key_outliers,
        layout.key_outlier_bits,
        layout.key_outlier_norm,
        layout.key_outlier_indices,
    ]
    regular, outlier = codec.key.regular.centroids, codec.key.outlier.centroids
    return regular.float().contiguous(), outlier.float().contiguous(), fields
