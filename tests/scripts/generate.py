"""Greedy generations through the real vLLM engine: python generate.py OUT.json JSON_ARGS.

JSON_ARGS: {"llm": {LLM kwargs}, "prompts": [...], "max_tokens": N, "repeat": R}. Prompts run
one at a time (batch composition changes the model's GEMM results slightly, in bf16 too), the
list R times over (later passes hit the prefix cache when it is enabled). OUT gets,
per pass and prompt: {"text", "token_ids", "prompt_logprobs" (of the prompt's own tokens)}.
"""

import json
import sys

from vllm import LLM, SamplingParams

from tq_vllm.model import ensure_default_model

if __name__ == "__main__":
    out_path, spec = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=str(ensure_default_model()), enforce_eager=True, **spec["llm"])
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 24), prompt_logprobs=0)
    runs = []
    for _ in range(spec.get("repeat", 1)):
        results = []
        for prompt in spec["prompts"]:
            o = llm.generate([prompt], params, use_tqdm=False)[0]
            ids = o.prompt_token_ids
            logprobs = [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
            results.append(
                {
                    "text": o.outputs[0].text,
                    "token_ids": list(o.outputs[0].token_ids),
                    "prompt_logprobs": logprobs,
                }
            )
        runs.append(results)
    with open(out_path, "w") as f:
        json.dump(runs, f)
