"""The serving benchmark's engine sizes (no engine needed)."""

from dataclasses import replace

from tq_vllm.tools.bench_serving import LONG, THROUGHPUT


def test_long_prefills_every_prompt_in_one_step_so_tpot_is_decode_alone():
    assert LONG.server_flags() == ["--max-model-len", "8192", "--max-num-batched-tokens", "32000"]
    at_16k = replace(LONG, input_len=16000, num_prompts=2)
    assert at_16k.server_flags() == [
        "--max-model-len", "16064", "--max-num-batched-tokens", "32000",
    ]  # fmt: skip
    assert "prefilled together" in at_16k.describe()


def test_other_scenarios_keep_vllms_step_budget():
    # 16 prompts of 204-3,891 tokens: the context holds the longest with its output.
    assert THROUGHPUT.server_flags() == ["--max-model-len", str(4096 + 64)]
    assert "prefilled together" not in THROUGHPUT.describe()
