"""Triton kernels over the compressed paged cache (and their PyTorch references).

Importing this package needs triton but not vLLM (the benchmarks rely on that).
"""

from tq_vllm.kernels.context import context_attention
from tq_vllm.kernels.decode import decode_attention
from tq_vllm.kernels.store import store_kv

__all__ = ["context_attention", "decode_attention", "store_kv"]
