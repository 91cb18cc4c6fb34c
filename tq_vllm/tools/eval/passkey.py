"""Passkey retrieval: greedy answers to the eval's passkey prompts."""

from __future__ import annotations

import time
from typing import Any

from tq_vllm.tools.eval.data import passkey_prompts


def measure_retrieval(llm: Any, trials: int, lengths: tuple[int, ...]) -> dict:
    from vllm import SamplingParams

    start = time.time()
    prompts = passkey_prompts(llm.get_tokenizer(), lengths, trials)
    outs = llm.generate(
        [{"prompt_token_ids": p["ids"]} for p in prompts],
        SamplingParams(max_tokens=8, temperature=0.0),
        use_tqdm=False,
    )
    retrieval: dict[str, list[int]] = {str(n): [] for n in lengths}
    for p, out in zip(prompts, outs, strict=True):
        retrieval[str(p["length"])].append(int(p["key"] in out.outputs[0].text))
    return {"retrieval": retrieval, "retrieval_seconds": time.time() - start}
