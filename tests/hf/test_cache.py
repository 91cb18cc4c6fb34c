"""TurboQuantCache in transformers' generate() on the embedded model, the seed-style
TurboQuantKVCache, and `tq-vllm demo --generate`."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tq_vllm import TurboQuantizer  # noqa: E402
from tq_vllm.hf import TurboQuantCache, TurboQuantKVCache  # noqa: E402
from tq_vllm.quant.quantizer import SERVED_GAIN  # noqa: E402
from tq_vllm.record.layout import RecordLayout  # noqa: E402
from tq_vllm.tools import cli  # noqa: E402
from tq_vllm.tools.model import ensure_default_model  # noqa: E402

# Greedy K8 V8 text equals the uncompressed cache's, 32 tokens each, for these prompts batched
# together in float32. Not for every prompt: in a batch of 8 (more left padding), "The largest
# planet in the solar system is", "The first president of the United States was" and "The Great
# Wall of China is" part from it after 20-25 tokens, at near-tied logits (each matches alone).
# In bfloat16, "The capital of France is" alone parts after 12 tokens ("2018-01-11" for
# "2018-01-10"): the 8-bit reconstruction is rounded to bf16 on top of the model's own rounding.
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The chemical symbol for gold is",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On 2 cores shared with another process (CI), OpenMP's barriers made one 32-token
    # generation of this small model take 60 s with 2 threads; it takes 3 s with 1.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    path = ensure_default_model()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    # float32: about twice as fast as bf16 on these CPUs, and exact greedy agreement at K8 V8.
    lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return lm, tokenizer


def generate(model, cache, max_new_tokens: int, **kwargs):
    lm, tokenizer = model
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = lm.generate(
        **inputs,
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    texts = tokenizer.batch_decode(sequences[:, inputs.input_ids.shape[1] :])
    return out, texts


def record_bytes(key_bits: int, value_bits: int, head_dim: int = 64, key_mode: str = "mse") -> int:
    return RecordLayout(head_dim, key_bits, key_mode, value_bits).size


def test_k8v8_fully_compressed_generates_the_uncompressed_text(model):
    _, dense = generate(model, transformers.DynamicCache(), 32)
    cache = TurboQuantCache(key_bits=8, value_bits=8, residual_length=0)
    out, texts = generate(model, cache, 32)
    assert texts == dense
    assert all(len(t) > 20 for t in texts)
    # Every token the model wrote is compressed: the last generated token is never fed back.
    tokens = out.shape[1] - 1
    layers, kv_heads = 30, 3
    assert cache.get_seq_length() == tokens and len(cache.layers) == layers
    assert all(layer.compressed_tokens == tokens for layer in cache.layers)
    assert cache.memory_bytes() == layers * len(PROMPTS) * kv_heads * tokens * record_bytes(8, 8)
    assert cache.uncompressed_bytes() == layers * len(PROMPTS) * kv_heads * tokens * 2 * 64 * 4


def test_k4v4_with_a_residual_generates_finite_text(model):
    # A residual of 8 tokens: it fills, is quantized and refills during the generation.
    cache = TurboQuantCache(key_bits=4, value_bits=4, residual_length=8)
    out, texts = generate(model, cache, 16, return_dict_in_generate=True, output_logits=True)
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert all(t.strip() for t in texts)
    tokens = out.sequences.shape[1] - 1
    layer = cache.layers[0]
    residual = layer.get_seq_length() - layer.compressed_tokens
    assert 0 < layer.compressed_tokens < tokens and 0 <= residual <= 8
    per_head = layer.compressed_tokens * record_bytes(4, 4) + residual * 2 * 64 * 4
    assert cache.memory_bytes() == 30 * len(PROMPTS) * 3 * per_head


@pytest.mark.parametrize(
    "key_bits, value_bits, key_mode, dtype",
    [(4, 4, "mse", torch.bfloat16), (8, 8, "mse", torch.float16), (3, 2, "prod", torch.float32)],
)
@pytest.mark.parametrize("residual_length", [0, 5])
def test_memory_matches_the_record_layout(key_bits, value_bits, key_mode, dtype, residual_length):
    cache = TurboQuantKVCache(key_bits, value_bits, residual_length, seed=3, key_mode=key_mode)
    batch, heads, head_dim = 2, 3, 64
    for tokens in (7, 1, 1, 4, 2):
        kv = torch.randn(batch, heads, tokens, head_dim).to(dtype)
        cache.append(kv, kv)
    # residual_length 5: the 7 tokens are quantized at once, then 1 + 1 + 4 = 6 together; the
    # last 2 stay in the residual. residual_length 0: every token is quantized.
    compressed, residual = (13, 2) if residual_length else (15, 0)
    record = record_bytes(key_bits, value_bits, head_dim, key_mode)
    width = 2 * head_dim * dtype.itemsize
    expected = batch * heads * (compressed * record + residual * width)
    assert cache.memory_usage_bits() == 8 * expected
    assert cache.layer.uncompressed_bytes() == batch * heads * 15 * width


def test_seed_interface_reads_the_dequantized_tokens():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 3, 11, 64, generator=gen) * 2
    values = torch.randn(2, 3, 11, 64, generator=gen)
    cache = TurboQuantKVCache(key_bits=4, value_bits=3, residual_length=4, seed=7)
    cache.append(keys[:, :, :6], values[:, :, :6])  # 6 > 4: quantized
    cache.append(keys[:, :, 6:], values[:, :, 6:])  # 5 > 4: quantized
    cache.append(keys[:, :, :2], values[:, :, :2])  # kept in the residual
    keys, values = torch.cat([keys, keys[:, :, :2]], 2), torch.cat([values, values[:, :, :2]], 2)

    def expected(x: torch.Tensor, bits: int) -> torch.Tensor:
        tq = TurboQuantizer(64, bits, "mse", seed=7, gain=SERVED_GAIN)
        return torch.cat([tq.dequantize(tq.quantize(x[:, :, :11])), x[:, :, 11:]], dim=2)

    k_hat, v_hat = expected(keys, 4), expected(values, 3)
    assert not torch.allclose(k_hat, keys, atol=1e-2)  # the old tokens really are compressed
    query = torch.randn(2, 6, 5, 64, generator=gen)  # 6 query heads over 3 KV heads
    scores = cache.attention_scores(query)
    assert scores.shape == (2, 6, 5, 13)
    want = query @ k_hat.repeat_interleave(2, dim=1).transpose(-1, -2)
    torch.testing.assert_close(scores, want)
    torch.testing.assert_close(cache.get_values(), v_hat)

    layer = cache.layer
    layer.crop(-3)  # into the compressed tokens
    torch.testing.assert_close(layer.key_states(), k_hat[:, :, :10])
    layer.batch_select_indices(torch.tensor([1]))
    torch.testing.assert_close(layer.value_states(), v_hat[1:, :, :10])
    with pytest.raises(ValueError, match="heads a multiple of 3"):
        cache.attention_scores(torch.randn(1, 4, 1, 64))
    with pytest.raises(ValueError, match="empty"):
        TurboQuantKVCache().get_values()
    with pytest.raises(ValueError, match="residual_length"):
        TurboQuantCache(residual_length=-1)


def test_demo_generate_prints_the_text_and_the_ratio(capsys):
    argv = ["demo", "--generate", "The capital of France is", "--max-new-tokens", "8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "The capital of France is Paris" in out
    # 5 prompt tokens + 7 fed back, all in the bf16 residual of 128 tokens: none compressed.
    assert "12 tokens x 30 layers x 3 KV heads, K4 V4, 0 tokens compressed" in out
    assert "KV bytes: 276,480 held vs 276,480 in a DynamicCache (bf16): 1.00x" in out
