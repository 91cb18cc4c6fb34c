"""Greedy generations through the real vLLM engine: python generate.py OUT.json JSON_ARGS.

JSON_ARGS: {"llm": {LLM kwargs; model: the embedded one unless given}, "prompts": [...],
"max_tokens": N, "repeat": R, "batch": false}. A prompt is a string or a list of token ids.
Prompts run one at a time (batch composition changes the model's GEMM results slightly, in bf16
too), the list R times over; with "batch" all of them go in at once (one pass), each to exactly
max_tokens (EOS ignored, so every request grows), which can drive vLLM into preemption. The
first pass also returns the prompt's logprobs; vLLM skips reading the prefix cache for such
requests, so later passes ask for none and do read it. OUT gets
{"runs": [[{"text", "prompt_token_ids", "token_ids", "prompt_logprobs", "logprobs"}...] per
pass] ("logprobs": the generated tokens', batch mode only), "prefix_cache_hits": N,
"num_preemptions": N, and the speculative-decoding counters where drafts ran
("spec_decode_num_draft_tokens", ...)}.
"""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from tq_vllm.tools.model import ensure_default_model

COUNTERS = (
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions",
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
)

if __name__ == "__main__":
    out_path, spec = sys.argv[1], json.loads(sys.argv[2])
    defaults = dict(model=str(ensure_default_model()), enforce_eager=True, disable_log_stats=False)
    llm = LLM(**{**defaults, **spec["llm"]})
    max_tokens = spec.get("max_tokens", 24)
    runs = []
    for index in range(spec.get("repeat", 1)):
        params = SamplingParams(
            temperature=0,
            max_tokens=max_tokens,
            prompt_logprobs=0 if index == 0 else None,
            logprobs=0 if spec.get("batch") else None,
            ignore_eos=bool(spec.get("batch")),
        )
        prompts = [
            TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in spec["prompts"]
        ]
        groups = [prompts] if spec.get("batch") else [[p] for p in prompts]
        outputs = [o for group in groups for o in llm.generate(group, params, use_tqdm=False)]
        results = []
        for o in outputs:
            ids, gen = o.prompt_token_ids, o.outputs[0]
            logprobs = (
                [o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
                if o.prompt_logprobs
                else None
            )
            results.append(
                {
                    "text": gen.text,
                    "prompt_token_ids": list(ids),
                    "token_ids": list(gen.token_ids),
                    "prompt_logprobs": logprobs,
                    "logprobs": [lp[t].logprob for t, lp in zip(gen.token_ids, gen.logprobs)]
                    if gen.logprobs
                    else None,
                }
            )
        runs.append(results)
    counters = {name.removeprefix("vllm:"): 0 for name in COUNTERS}
    for m in llm.get_metrics():
        if m.name in COUNTERS:
            counters[m.name.removeprefix("vllm:")] += m.value
    with open(out_path, "w") as f:
        json.dump({"runs": runs, **counters}, f)
