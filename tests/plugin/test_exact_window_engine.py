"""exact_window in the real engine: each query's newest tokens (up to 32) read exactly, the rest
from K4 V4 records; the rings inside vLLM's KV budget; with window_prefill "decode" the same
results whatever the chunking or prefix-cache hits; with "chunk" (the default) a prefill chunk
reads its own tokens exactly."""

import json
import re

import pytest
import torch
from cases import generate, vllm_attention_on_amx

vllm = pytest.importorskip("vllm")

pytestmark = pytest.mark.server
HISTORY = (
    "The history of the Roman Empire spans many centuries. It began when Augustus became "
    "the first emperor in 27 BC, and in the West it ended in AD 476. "
)
PROMPT = HISTORY * 4 + "In summary, the first Roman emperor was"
PROMPTS = [PROMPT, PROMPT + " a man named"]
K4V4 = {"key_bits": 4, "value_bits": 4, "exact_window": 0}
BASE = {"max_model_len": 1024, "kv_cache_memory_bytes": 1 << 28, "enable_prefix_caching": False}
WINDOWED = {  # prefill rows read as decode rows: results independent of the chunking
    "kv_cache_dtype": "turboquant",
    "additional_config": {"turboquant": {**K4V4, "exact_window": 32, "window_prefill": "decode"}},
}
CHUNK_PREFILL = {
    "kv_cache_dtype": "turboquant",
    "additional_config": {"turboquant": {**K4V4, "exact_window": 32, "window_prefill": "chunk"}},
}
# K4 V4 on the embedded model: 68 bytes x 3 KV heads x 30 layers per token, 128-token blocks
# (a ring's block is padded to the same page).
BLOCK_BYTES = 68 * 3 * 30 * 128
CONCURRENCY = re.compile(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x")


def gap(run, ref):
    pairs = list(zip(run["prompt_logprobs"], ref["prompt_logprobs"]))
    return sum(abs(a - b) for a, b in pairs) / len(pairs)


@pytest.fixture(scope="module")
def whole_prompts(tmp_path_factory):
    """K4 V4 with the 32-token window, each prompt prefilled whole: (runs, engine log)."""
    logs: list[str] = []
    runs = generate(
        tmp_path_factory.mktemp("whole"),
        {**BASE, **WINDOWED, "enable_chunked_prefill": False},
        PROMPTS,
        log=logs,
    )[0]
    return runs, logs[0]


def test_exact_window_is_closer_to_bf16_and_counted_by_vllm(tmp_path, whole_prompts):
    (windowed, _), window_log = whole_prompts
    logs: list[str] = []
    bf16, k4v4, chunk = (
        generate(tmp_path, {**BASE, **extra}, [PROMPT], max_tokens=4, log=logs)[0][0]
        for extra in (
            {},
            {"kv_cache_dtype": "turboquant", "additional_config": {"turboquant": K4V4}},
            {**CHUNK_PREFILL, "enable_chunked_prefill": False},
        )
    )
    assert "exact window: each query's newest tokens (up to 32)" in window_log
    assert "prefill chunks read as 'decode'" in window_log
    # Measured 2026-12-02: mean |prompt logprob - bf16's| K4 V4 0.131, with the window 0.060.
    # On AMX (2026-12-05): K4 V4 0.086, with the window 0.052, the jitter in both. A whole
    # prompt read as one chunk reads every prompt token exactly (2026-12-06, AMX: 0.020).
    print(
        f"mean gaps to bf16: K4 V4 {gap(k4v4, bf16):.3f}, exact window {gap(windowed, bf16):.3f}"
        f", the prompt as one exact chunk {gap(chunk, bf16):.3f}"
    )
    assert gap(windowed, bf16) < (0.7 if vllm_attention_on_amx() else 0.6) * gap(k4v4, bf16)
    assert gap(chunk, bf16) < 0.5 * gap(windowed, bf16)
    assert "Augustus" in windowed["text"] and "Augustus" in chunk["text"]
    # One ring block per request for its whole life, in vLLM's own count: requests of 1,024
    # tokens in 128-token blocks hold 8 record blocks, plus the ring's.
    plain, ringed = (float(CONCURRENCY.search(log).group(1)) for log in (logs[1], window_log))
    assert ringed == pytest.approx(plain * 8 / 9, rel=0.01), (plain, ringed)


def test_exact_window_gives_the_same_results_whatever_the_chunking(tmp_path, whole_prompts):
    """Chunks of 45 tokens (not a multiple of the window), and prefix-cache hits (which start
    at block boundaries, where the rule's anchors are), against one whole-prompt prefill. Every
    chunk here has 16 rows or more (the prompts' 155 and 158 tokens leave 20 and 23), so all
    take the dense path, as the whole prompt does; a shorter chunk runs the fused op, which
    rounds differently (0.16 nats apart at most on these prompts' last 7 tokens, chunks of 37).
    On AMX (cases.vllm_attention_on_amx) the bound is 0.15 nats and the tokens may differ; a
    cache read at wrong positions moves logprobs by nats."""
    amx = vllm_attention_on_amx()
    plain, _ = whole_prompts
    chunked, cached = generate(
        tmp_path,
        {**BASE, **WINDOWED, "max_num_batched_tokens": 45, "enable_prefix_caching": True},
        PROMPTS,
        repeat=2,
    )
    hits = json.loads(sorted(tmp_path.glob("out*.json"))[-1].read_text())["prefix_cache_hits"]
    assert hits >= 128  # the second pass started after whole cached blocks
    for a, b, c in zip(plain, chunked, cached):
        if not amx:
            assert a["token_ids"] == b["token_ids"] == c["token_ids"], (a["text"], b["text"])
        diff = max(abs(x - y) for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"]))
        assert diff < (0.15 if amx else 1e-3), diff


def test_exact_window_recomputes_the_same_cache_after_preemption(tmp_path):
    """16 requests at once in a KV budget for about three (each crosses into a second block
    while decoding), so vLLM preempts and recomputes. A recomputed request restarts at position
    0 with whatever its new ring holds; by the rule it reads nothing from it that it did not
    write. Each generated token's logprob must match one fresh prefill of prompt + generated
    tokens (batch composition moves bf16 rounding a little; a wrong cache moves most tokens by
    nats)."""
    llm = {**BASE, **WINDOWED, "max_model_len": 256}
    # ~86 prompt tokens, 134 after decoding: each request needs a second block mid-decode.
    prompts = [f"{HISTORY * 2}Question {i}: who was the first emperor of Rome?" for i in range(16)]
    counters: dict = {}
    (runs,) = generate(
        tmp_path, {**llm, "kv_cache_memory_bytes": 7 * BLOCK_BYTES}, prompts, max_tokens=48,
        counters=counters, batch=True,
    )  # fmt: skip
    assert counters["num_preemptions"] > 0, counters
    whole = [r["prompt_token_ids"] + r["token_ids"] for r in runs]
    (fresh,) = generate(tmp_path, llm, whole, max_tokens=1)
    gaps = torch.tensor(
        [
            [a - b for a, b in zip(f["prompt_logprobs"][-len(r["logprobs"]) :], r["logprobs"])]
            for f, r in zip(fresh, runs)
        ]
    ).abs()
    print(f"preemptions {counters['num_preemptions']}: max {gaps.max():.3f} mean {gaps.mean():.3f}")
    assert gaps.max() < 1.0 and gaps.mean() < 0.05  # measured 2026-12-02: 0.152, 0.001


def test_a_float32_model_keeps_its_window_in_bf16_rings(tmp_path, whole_prompts):
    """A float32 ring of 32 tokens (16,384 bytes per KV head) outgrows a 128-token block of K4
    V4 records (8,704): the ring is bf16 instead, and costs what a bf16 model's does."""
    logs: list[str] = []
    (run,) = generate(
        tmp_path, {**BASE, **WINDOWED, "dtype": "float32"}, [PROMPT], max_tokens=4, log=logs
    )[0]
    assert "exact_window: rings of 32 tokens in bf16" in logs[0]
    assert "Augustus" in run["text"]
    float32, bf16 = (float(CONCURRENCY.search(log).group(1)) for log in (logs[0], whole_prompts[1]))
    assert float32 == pytest.approx(bf16, rel=0.01), (float32, bf16)


def test_a_ring_larger_than_a_block_of_records_is_refused_or_gets_larger_blocks(tmp_path):
    """K3 V3 keeps 52 bytes per token per KV head: 128 tokens of records are 6,656 bytes, less
    than a 32-token ring (8,192); vLLM would pad every block to the ring's page. --block-size
    128 is refused; without one the blocks grow to 256 tokens."""
    tq = {"turboquant": {"key_bits": 3, "value_bits": 3, "exact_window": 32}}
    llm = {**BASE, "kv_cache_dtype": "turboquant", "additional_config": tq}
    with pytest.raises(AssertionError, match="larger than a 128-token block of records"):
        generate(tmp_path, {**llm, "block_size": 128}, ["Hi"])
    logs: list[str] = []
    (run,) = generate(tmp_path, llm, [PROMPT], max_tokens=4, log=logs)[0]
    assert "exact_window 32: 256-token blocks (was 128)" in logs[0]
    assert "Augustus" in run["text"]


@pytest.mark.parametrize(
    "bits,window,lookahead,block",
    [((5, 4), 32, 0, 128), ((6, 5), 32, 0, 128), ((3, 3), 32, 0, 256), ((4, 4), 16, 0, 64),
     ((4, 4), 16, 3, 128), ((4, 4), 256, 0, 1024)],
)  # fmt: skip
def test_smallest_block_holds_a_segment_and_a_16_bit_ring(bits, window, lookahead, block):
    from types import SimpleNamespace

    from tq_vllm.plugin.config import load_config
    from tq_vllm.plugin.startup import Settings, smallest_block

    config = load_config(
        {"turboquant": {"key_bits": bits[0], "value_bits": bits[1], "exact_window": window}}
    )
    settings = Settings(config, 64, 30, tuple(config.layouts(64, 30)))
    spec = SimpleNamespace(num_speculative_tokens=lookahead) if lookahead else None
    assert smallest_block(SimpleNamespace(speculative_config=spec), settings) == block
