"""TurboQuant for transformers without vLLM: TurboQuantCache, a `Cache` for
`model.generate(..., past_key_values=TurboQuantCache())`, and TurboQuantKVCache, one layer's
cache with append / attention_scores / get_values / memory_usage_bits."""

from tq_vllm.hf.cache import TurboQuantCache, TurboQuantKVCache, TurboQuantLayer

__all__ = ["TurboQuantCache", "TurboQuantKVCache", "TurboQuantLayer"]
