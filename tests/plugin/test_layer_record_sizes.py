"""Layers at different bits, served at their own record sizes: vLLM gives each layer its own
page (one KV-cache group, per-layer page sizes), so 8-bit edge layers cost bytes on those four
layers only instead of padding all thirty."""

import pytest
from cases import generate, vllm_attention_on_amx

from tq_vllm.plugin.config import load_config
from tq_vllm.tools.server import kv_cache_tokens

vllm = pytest.importorskip("vllm")

pytestmark = pytest.mark.server
PROMPTS = {
    "The capital of France is": "Paris",
    "The largest planet in the solar system is": "Jupiter",
    "The history of the Roman Empire spans many centuries. It began when Augustus became the "
    "first emperor in 27 BC, and in the West it ended in AD 476. "
    * 4
    + "In summary, the first Roman emperor was": "Augustus",
}
K4V4 = {"key_bits": 4, "value_bits": 4, "exact_window": 0}
EDGE8 = {**K4V4, "keep_first_layers": 2, "keep_last_layers": 2}  # keep_*_bits default to 8


def mean_gap(runs: list[dict], reference: list[dict]) -> float:
    gaps = [
        abs(a - b)
        for run, ref in zip(runs, reference)
        for a, b in zip(run["prompt_logprobs"], ref["prompt_logprobs"])
    ]
    return sum(gaps) / len(gaps)


def test_edge_layers_at_8_bits_cost_only_their_own_bytes(tmp_path):
    llm = {"max_model_len": 1024, "kv_cache_memory_bytes": 1 << 27}
    runs, tokens = {}, {}
    for name, fields in (("bf16", None), ("k4v4", K4V4), ("edge8", EDGE8)):
        config = llm if fields is None else {
            **llm, "kv_cache_dtype": "turboquant", "additional_config": {"turboquant": fields}
        }  # fmt: skip
        logs: list[str] = []
        runs[name] = generate(tmp_path, config, list(PROMPTS), max_tokens=8, log=logs)[0]
        tokens[name] = kv_cache_tokens(logs[0])
    sizes = [lay.record_bytes for lay in load_config({"turboquant": EDGE8}).layouts(64, 30)]
    assert sizes[:2] == sizes[-2:] == [132, 132] and set(sizes[2:28]) == {68}
    # vLLM's count follows the summed record sizes (to its block rounding): 30 x 68 bytes per
    # token and KV head for K4 V4, 26 x 68 + 4 x 132 for the edges. Padding every record to
    # 132 bytes would have given k4v4's count x 68 / 132.
    expected = tokens["k4v4"] * 30 * 68 / sum(sizes)
    print("KV cache tokens:", tokens, f"edge8 expected {expected:.0f}")
    assert abs(tokens["edge8"] / expected - 1) < 0.01, (tokens, expected)
    assert tokens["edge8"] > 1.7 * tokens["k4v4"] * 68 / 132
    # Each layer reads its records with its own layout: the facts survive, and the 8-bit edges
    # bring the prompt logprobs closer to bf16's than K4 V4 (measured mean gap 0.119 nats
    # against 0.136; a layer read with another layer's layout gives garbage). On AMX
    # (cases.vllm_attention_on_amx) the order did not hold: 0.118 against 0.094 on a Xeon
    # with AMX, 2026-12-05; there both must stay close.
    for (prompt, fact), run in zip(PROMPTS.items(), runs["edge8"]):
        assert fact in run["text"], (prompt, run["text"])
    gaps = {name: mean_gap(runs[name], runs["bf16"]) for name in ("k4v4", "edge8")}
    print("mean |prompt logprob - bf16's|:", gaps)
    assert max(gaps.values()) < 0.2, gaps
    if not vllm_attention_on_amx():
        assert gaps["edge8"] < gaps["k4v4"], gaps
