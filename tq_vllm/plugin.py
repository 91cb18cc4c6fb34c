"""vLLM general-plugin entry point (pyproject: vllm.general_plugins -> turboquant)."""

from __future__ import annotations

_registered = False


def register() -> None:
    """Called by vLLM in every process (API server, engine core, workers). Idempotent."""
    global _registered
    if _registered:
        return
    import logging

    from tq_vllm import compat

    logger = logging.getLogger("tq_vllm")
    if not logger.handlers:  # vLLM configures only its own logger tree
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [tq_vllm] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    compat.register_cache_dtype()
    compat.register_attention_backend()
    compat.route_attention_backend()
    compat.validate_at_startup()
    _registered = True
