"""vLLM general-plugin entry point (pyproject: vllm.general_plugins -> turboquant)."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Called by vLLM in every process (API server, engine core, workers). Idempotent."""
    global _registered
    if _registered:
        return
    from tq_vllm import compat

    compat.register_cache_dtype()
    compat.register_attention_backend()
    compat.route_attention_backend()
    compat.validate_at_startup()
    _registered = True
