"""`tq-vllm eval`: quality of every KV-cache config on the embedded model, side by side.

Each config runs in its own process (worker.py: one vLLM engine, freed when the process ends)
with chunked prefill in chunks of at most 128 tokens: every query of a chunk reads its keys and
values back from the compressed cache, its own chunk included (the backend stores a chunk
before attending), so each predicted token sees exactly what a decode step would. Measured per
config:
  - perplexity from vLLM's prompt logprobs over 2K-token windows of pydoc_data/topics.py
    (perplexity.py),
  - passkey retrieval: a 5-digit key planted at depths 0.1..0.9 of filler text, greedy answer
    (passkey.py),
  - KV capacity: the tokens vLLM fits in a fixed 1 GiB KV cache (what it really allocates),
and in this process, attention fidelity on the model's real post-RoPE keys and queries
(fidelity.py). configs.py names the configs, data.py builds the inputs, report.py writes the
markdown table, the JSON file and the plot; run.py drives it all.
"""
