"""A hybrid model (sliding-window layers and a global one) with its sliding-window layers kept
in the model dtype: vLLM then hands each layer a strided view of a buffer shared by two page
sizes, which the backend once refused inside forward (the engine died on the first request)."""

import pytest
from cases import generate, tiny_hybrid_model

vllm = pytest.importorskip("vllm")

pytestmark = pytest.mark.server
PROMPT = " ".join(f"Item {i} is on shelf {i % 7}." for i in range(30))  # past the window


def test_hybrid_model_serves_with_sliding_window_layers_skipped(tmp_path):
    model = str(tiny_hybrid_model(tmp_path / "model"))
    llm = {"model": model, "max_model_len": 512, "kv_cache_memory_bytes": 1 << 26}
    compressed = {
        **llm,
        "kv_cache_dtype": "turboquant",
        "kv_cache_dtype_skip_layers": ["sliding_window"],
        "additional_config": {"turboquant": {"key_bits": 8, "value_bits": 8}},
    }
    logs: list[str] = []
    (bf16,) = generate(tmp_path, llm, [PROMPT], max_tokens=8)
    (ours,) = generate(tmp_path, compressed, [PROMPT], max_tokens=8, log=logs)
    assert "TurboQuant attention backend serving model.layers.3.self_attn.attn" in logs[0]
    # The global layer at K8 V8 (the sliding ones in bf16) picks bf16's greedy tokens.
    assert ours[0]["token_ids"] == bf16[0]["token_ids"]
