"""Where the kernel tests run the Triton kernels.

By default the interpreter runs them on CPU tensors (conftest sets TRITON_INTERPRET=1). On a
machine with a GPU, `TRITON_INTERPRET=0 pytest tests/test_kernels_*.py` compiles them for real:
inputs built on the CPU move to the GPU for the kernel, its results come back, and the PyTorch
reference still runs on the CPU, so the comparison and its tolerance are the same either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from tq_vllm.codec import LayerCodec

DEVICE = torch.device(
    "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
)


def _to_device(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return arg.to(DEVICE)
    if isinstance(arg, LayerCodec):
        return LayerCodec(arg.layout, arg.key.seed, DEVICE)
    return arg


def run_kernel(kernel: Callable, *args: Any, **kwargs: Any) -> Any:
    """kernel(*args, **kwargs) on DEVICE. Tensor arguments the kernel writes in place (the
    cache) are copied back into the CPU originals; a tensor result comes back on the CPU."""
    if DEVICE.type == "cpu":
        return kernel(*args, **kwargs)
    moved = [_to_device(a) for a in args]
    out = kernel(*moved, **{k: _to_device(v) for k, v in kwargs.items()})
    for orig, dev in zip(args, moved):
        if isinstance(orig, torch.Tensor):
            orig.copy_(dev.cpu())
    return out.cpu() if isinstance(out, torch.Tensor) else out
