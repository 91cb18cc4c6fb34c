"""The eval's inputs, identical for every config: perplexity windows of the language
reference that ships with Python, and passkey prompts."""

from __future__ import annotations

import math
import random
from typing import Any

WINDOW = 2048  # tokens per perplexity window
LENGTHS = (1024, 2048, 4096, 7168)  # retrieval prompt lengths (tokens)
DEPTHS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def text_ids(tokenizer: Any) -> list[int]:
    import pydoc_data.topics as topics

    return tokenizer.encode("\n\n".join(topics.topics.values()))


def ppl_windows(ids: list[int], tokens: int) -> list[list[int]]:
    """Enough WINDOW-token windows to predict at least `tokens` tokens."""
    count = max(1, math.ceil(tokens / (WINDOW - 1)))
    if count * WINDOW > len(ids):
        raise ValueError(f"--tokens {tokens}: the text has only {len(ids)} tokens")
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(count)]


FILLER = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
HEADER = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the pass key.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompts(tokenizer: Any, lengths: tuple[int, ...], trials: int) -> list[dict]:
    """`trials` prompts per length, depths cycling through DEPTHS, keys from a fixed seed."""
    rng = random.Random(0)
    header, question = (
        tokenizer.encode(HEADER),
        tokenizer.encode(QUESTION, add_special_tokens=False),
    )
    unit = tokenizer.encode(FILLER, add_special_tokens=False)
    prompts = []
    for length in lengths:
        for t in range(trials):
            key = str(rng.randint(10000, 99999))
            needle = tokenizer.encode(
                f" The pass key is {key}. Remember it. {key} is the pass key.",
                add_special_tokens=False,
            )
            units = (length - len(header) - len(needle) - len(question)) // len(unit)
            depth = DEPTHS[t % len(DEPTHS)]
            before = round(depth * units)
            ids = header + unit * before + needle + unit * (units - before) + question
            prompts.append({"length": length, "depth": depth, "key": key, "ids": ids})
    return prompts
