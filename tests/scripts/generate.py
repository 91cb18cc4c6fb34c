"""Greedy generations through the real vLLM engine: python generate.py OUT.json JSON_ARGS.

JSON_ARGS: {"llm": {LLM kwargs}, "prompts": [...], "max_tokens": N, "repeat": R}. The prompts
run R times in sequence (the second pass hits the prefix cache when it is enabled).
"""

import json
import sys

from vllm import LLM, SamplingParams

from tq_vllm.model import ensure_default_model

if __name__ == "__main__":
    out_path, spec = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=str(ensure_default_model()), enforce_eager=True, **spec["llm"])
    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 24))
    runs = []
    for _ in range(spec.get("repeat", 1)):
        outputs = llm.generate(spec["prompts"], params)
        runs.append([o.outputs[0].text for o in outputs])
    with open(out_path, "w") as f:
        json.dump(runs, f)
