"""Perplexity from vLLM's prompt logprobs over the eval's text windows."""

from __future__ import annotations

import math
import time
from typing import Any

from tq_vllm.plugin import compat
from tq_vllm.tools.eval.data import ppl_windows, text_ids

# The conversation length capacity is counted at: vLLM's maximum concurrency for requests of
# this many tokens, every KV-cache group included (an exact window's rings cost one block each).
CONVERSATION_TOKENS = 2048


def measure_ppl(llm: Any, tokens: int) -> dict:
    from vllm import SamplingParams

    cache = llm.llm_engine.vllm_config.cache_config
    start = time.time()
    windows = ppl_windows(text_ids(llm.get_tokenizer()), tokens)
    outs = llm.generate(
        [{"prompt_token_ids": w} for w in windows],
        SamplingParams(max_tokens=1, prompt_logprobs=0),
        use_tqdm=False,
    )
    nll, count = 0.0, 0
    for window, out in zip(windows, outs, strict=True):
        for pos in range(1, len(window)):
            nll -= out.prompt_logprobs[pos][window[pos]].logprob
            count += 1
    return {
        "ppl": math.exp(nll / count),
        "ppl_tokens": count,
        "kv_tokens": cache.num_gpu_blocks * cache.block_size,
        "conversations": compat.max_concurrency(llm, CONVERSATION_TOKENS),
        "ppl_seconds": time.time() - start,
    }
