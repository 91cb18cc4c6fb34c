"""vLLM general-plugin entry point (pyproject: vllm.general_plugins -> turboquant).

The vLLM integration lives in this folder: register() here; backend.py (Metadata -> Builder ->
Backend -> Impl); startup.py (what is refused at startup, the deployment's settings);
config.py (the per-deployment config); compat.py (every vLLM version difference and patch).
"""

from __future__ import annotations

from typing import Any

BACKEND_PATH = "tq_vllm.plugin.backend.TurboQuantBackend"
_registered = False


def _unsupported_reasons(selector_config: Any) -> list[str]:
    from tq_vllm.plugin.backend import TurboQuantBackend

    return TurboQuantBackend.unsupported_reasons(selector_config)


def _check_vllm_config(vllm_config: Any) -> None:
    from tq_vllm.plugin.startup import check_vllm_config

    check_vllm_config(vllm_config)


def register() -> None:
    """Called by vLLM in every process (API server, engine core, workers). Idempotent."""
    global _registered
    if _registered:
        return
    import logging

    from tq_vllm.plugin import compat

    logger = logging.getLogger("tq_vllm")
    if not logger.handlers:  # vLLM configures only its own logger tree
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [tq_vllm] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    compat.register_cache_dtype()
    compat.register_attention_backend(BACKEND_PATH)
    compat.route_attention_backend(BACKEND_PATH, _unsupported_reasons)
    compat.validate_at_startup(_check_vllm_config)
    _registered = True
