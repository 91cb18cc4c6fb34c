"""Load and faults against one real OpenAI server with the TurboQuant KV cache.

The server's KV budget is tiny on purpose (16-token blocks, room for about a dozen requests at
their full length), so the 32-stream test also drives vLLM into preemption and recomputation.
K6 V5 records: the default's exact window needs blocks of 128 tokens (test_exact_window_engine.py
preempts with it).
"""

import concurrent.futures
import math
import time
from dataclasses import replace

import pytest
import torch

vllm = pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from tq_vllm.tools.bench_serving import scrape_metrics  # noqa: E402
from tq_vllm.tools.model import MODEL_NAME  # noqa: E402
from tq_vllm.tools.server import Server  # noqa: E402

pytestmark = pytest.mark.server
MAX_MODEL_LEN = 256
BLOCK_SIZE = 16
KV_BYTES = 8 << 20  # ~63 blocks of 16 tokens of K6 V5 records (8,280 bytes per token)
MAX_TOKENS = 24
STREAMS = 32  # about three times what the budget holds at full length
# A cache rebuilt wrongly after preemption (stale or foreign blocks) moves logprobs by several
# nats on most tokens; batch-dependent rounding through 30 quantized layers moves a few tokens by
# up to ~0.7 nats (measured) and the mean by far less.
MAX_LOGPROB_DIFF, MEAN_LOGPROB_DIFF = 1.5, 0.2
TEXT = (
    "The Roman Empire began when Augustus became the first emperor in 27 BC. Its capital, "
    "Rome, grew into the largest city of the ancient world, and its roads, laws and Latin "
    "language shaped Europe for centuries after the Western empire fell in AD 476. "
)  # ~55 tokens


def prompt(i: int) -> str:
    return f"{TEXT}Question {i}: in which year did the Western Roman Empire fall? Answer:"


@pytest.fixture(scope="module")
def server():
    flags = [
        "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(STREAMS),
        "--block-size", str(BLOCK_SIZE),
        "--kv-cache-memory-bytes", str(KV_BYTES), "--kv-cache-dtype", "turboquant",
        "--additional-config", '{"turboquant": {"config": "k6v5"}}',
    ]  # fmt: skip
    with Server(flags) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", timeout=600, max_retries=0)


def stream(client, text: str, max_tokens: int = MAX_TOKENS) -> tuple[str, list[float], str]:
    """One greedy streaming completion of exactly max_tokens (EOS ignored, so every request
    grows into new blocks): (text, [(token id, logprob)], finish reason)."""
    chunks = client.completions.create(
        model=MODEL_NAME, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
        logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )  # fmt: skip
    pieces, tokens, finish = [], [], None
    for c in chunks:
        if not c.choices:
            continue
        choice = c.choices[0]
        pieces.append(choice.text)
        if choice.logprobs:
            ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
            tokens += zip(ids, choice.logprobs.token_logprobs)
        finish = choice.finish_reason or finish
    return "".join(pieces), tokens, finish


def finite(tokens: list[tuple[int, float]]) -> bool:
    return all(math.isfinite(lp) for _, lp in tokens)


def rescored(server, client, prompts: list[str], generated: list[list[int]]) -> list[list[float]]:
    """Logprobs one fresh prefill per sequence assigns to the tokens each request generated."""
    ids = []
    for text, gen in zip(prompts, generated):
        r = httpx.post(
            server.url.removesuffix("/v1") + "/tokenize",
            json={"model": MODEL_NAME, "prompt": text},
            timeout=60,
        )
        ids.append(r.json()["tokens"] + gen)
    out = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=1, echo=True, logprobs=0, temperature=0
    )
    choices = sorted(out.choices, key=lambda c: c.index)
    return [c.logprobs.token_logprobs[-1 - len(g) : -1] for c, g in zip(choices, generated)]


def wait_idle(server, timeout: float = 60) -> dict[str, float]:
    base = server.url.removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = scrape_metrics(base)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            return m
        time.sleep(0.5)
    raise AssertionError(f"server still busy after {timeout} s: {m}")


def test_32_concurrent_streams_complete_through_preemption(server, client):
    base = server.url.removesuffix("/v1")
    before = scrape_metrics(base)["vllm:num_preemptions_total"]
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(lambda i: stream(client, prompt(i)), range(STREAMS)))
    preempted = scrape_metrics(base)["vllm:num_preemptions_total"] - before
    for text, tokens, finish in results:
        assert finish == "length" and len(tokens) == MAX_TOKENS, (finish, text)
        assert text.strip(), "empty output"
        assert finite(tokens), tokens
    assert preempted > 0, "the tiny KV budget should have forced preemption"
    # Recomputation after preemption must rebuild the same cache: a fresh prefill of prompt +
    # generated tokens gives each token the logprob the request reported while decoding. (Greedy
    # text is not compared: batch composition and prefix-cache hits change bf16 rounding, and
    # near-ties of a 135M model flip, in bf16 too.)
    generated = [[t for t, _ in tokens] for _, tokens, _ in results]
    fresh = rescored(server, client, [prompt(i) for i in range(STREAMS)], generated)
    diff = torch.tensor([[a - lp for a, (_, lp) in zip(f, r[1])] for f, r in zip(fresh, results)])
    worst, mean = diff.abs().max().item(), diff.abs().mean().item()
    print(f"preemptions {preempted:.0f}, logprob differences: max {worst:.3f}, mean {mean:.3f}")
    assert worst < MAX_LOGPROB_DIFF and mean < MEAN_LOGPROB_DIFF, (worst, mean)
    wait_idle(server)


def test_client_disconnect_mid_stream_leaves_others_alone(server, client):
    def disconnect_after_two_chunks() -> int:
        body = {
            "model": MODEL_NAME, "prompt": prompt(100), "max_tokens": 200, "temperature": 0,
            "stream": True,
        }  # fmt: skip
        with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 2:
                    return seen  # leaving the block closes the connection mid-stream
        raise AssertionError("stream ended before two chunks")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        others = [pool.submit(stream, client, prompt(200 + i)) for i in range(6)]
        dropped = [pool.submit(disconnect_after_two_chunks) for _ in range(2)]
        assert [f.result() for f in dropped] == [2, 2]
        results = [f.result() for f in others]
    for text, tokens, finish in results:
        assert finish == "length" and text.strip() and finite(tokens)
    metrics = wait_idle(server)  # the dropped requests were aborted, not left running
    assert metrics["vllm:num_requests_running"] == 0
    text, _, _ = stream(client, prompt(300))
    assert text.strip()


def test_over_long_request_gets_400_and_server_keeps_serving(server, client):
    too_long = TEXT * 6  # ~330 tokens > max_model_len
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt=too_long, max_tokens=8)
    assert err.value.status_code == 400
    message = str(err.value)
    assert str(MAX_MODEL_LEN) in message and "context length" in message, message
    text, _, finish = stream(client, prompt(400))
    assert finish == "length" and text.strip()


def test_unsupported_model_refused_at_startup(tmp_path):
    """A model with attention logit soft-capping (a tiny random-weight Gemma 2 built offline,
    with the embedded model's tokenizer): the server exits at startup and says why."""
    import shutil

    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tq_vllm.tools.model import ensure_default_model
    from tq_vllm.tools.server import run_until_exit

    config = Gemma2Config(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=64,
        attn_logit_softcapping=50.0, query_pre_attn_scalar=64, max_position_embeddings=1024,
    )  # fmt: skip
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    for f in ensure_default_model().iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, tmp_path / f.name)
    flags = ["--model", str(tmp_path), "--enforce-eager", "--max-model-len", "256"]
    code, log = run_until_exit(flags, timeout=300)
    assert code not in (0, None), log[-3000:]
    assert "does not support: logits soft-capping" in log, log[-3000:]


def test_serving_benchmark_runs_against_the_server(server):
    """`tq-vllm bench`'s measurement (vLLM's own benchmark client plus the /metrics watcher) on
    a tiny workload: every request completes and the engine's peak concurrency is seen."""
    from tq_vllm.tools.bench_serving import QUICK, measure

    workload = replace(QUICK, input_len=64, max_model_len=MAX_MODEL_LEN)
    result = measure(server, workload)
    assert result["completed"] == workload.num_prompts and result["failed"] == 0
    assert 1 <= result["peak_running"] <= workload.max_concurrency
    assert result["output_throughput"] > 0 and result["p99_ttft_ms"] >= result["p50_ttft_ms"]
