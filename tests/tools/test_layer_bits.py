"""Bits per layer by measured sensitivity: the allocation's rule on known costs, and
`tq-vllm calibrate --layer-bits` on the embedded model."""

import pytest

from tq_vllm.plugin.config import load_config
from tq_vllm.tools.layer_bits import PARTS, allocate, options


def costs(weights: dict[tuple[int, str], float], layers: int = 4) -> dict:
    """A part's KL halves with every bit, from its weight at 1 bit (default weight 1)."""
    return {
        (layer, part, bits): weights.get((layer, part), 1.0) / 2**bits
        for layer in range(layers)
        for part in PARTS
        for bits in range(1, 9)
    }


def test_equal_parts_stay_uniform():
    plan = allocate(costs({}), 4, 4)
    assert plan.key_bits == [4] * 4 and plan.value_bits == [4] * 4
    assert plan.kl == pytest.approx(plan.uniform_kl)


def test_bits_go_where_the_kl_falls_most():
    """Layer 0's keys weigh 16x the rest: two more bits there (the most options() allows) are
    paid by the cheapest drops elsewhere; the total stays uniform K4 V4's."""
    plan = allocate(costs({(0, "key"): 16.0}), 4, 4)
    assert plan.key_bits[0] == 6
    assert sum(plan.key_bits) + sum(plan.value_bits) == 4 * 8
    assert all(3 <= b <= 4 for b in plan.key_bits[1:] + plan.value_bits)
    assert plan.kl < plan.uniform_kl


def test_options_stay_within_two_bits_and_1_to_8():
    assert list(options(4)) == [2, 3, 4, 5, 6]
    assert list(options(1)) == [1, 2, 3] and list(options(8)) == [6, 7, 8]


def test_measured_costs_fall_with_bits_and_keys_cost_more():
    """measure_costs on the embedded model (64 tokens): averaged over layers, the KL falls with
    every bit, and keys cost more than values at equal bits (measured ~8x on 256 tokens). Reruns
    that read a stale KV cache instead of the quantized keys would break both."""
    from transformers import AutoTokenizer

    from tq_vllm.tools.calibrate import calibration_ids
    from tq_vllm.tools.layer_bits import measure_costs
    from tq_vllm.tools.model import ensure_default_model

    model = str(ensure_default_model())
    ids = calibration_ids(AutoTokenizer.from_pretrained(model), 64)
    cost = measure_costs(model, ids, 4, 4)
    mean = {
        (part, b): sum(cost[(layer, part, b)] for layer in range(30)) / 30
        for part in PARTS
        for b in options(4)
    }
    for part in PARTS:
        falls = [mean[(part, b)] for b in options(4)]
        assert falls == sorted(falls, reverse=True), (part, falls)
    assert all(mean[("key", b)] > 2 * mean[("value", b)] for b in options(4)), mean


def test_calibrate_layer_bits_writes_a_config_of_uniform_bytes(tmp_path, capsys):
    """On the embedded model (32 tokens: the rule, not the numbers): per-layer overrides that
    load through the normal config path and store exactly uniform K4 V4's bytes."""
    from tq_vllm.tools.cli import main

    out = tmp_path / "layer-bits.yaml"
    assert main(["calibrate", str(out), "--layer-bits", "--tokens", "32"]) == 0
    assert "Bits per layer at the bytes of uniform K4 V4" in capsys.readouterr().out
    config = load_config({"turboquant": {"config": str(out)}})
    layouts = config.layouts(64, 30)
    uniform = load_config({"turboquant": {"key_bits": 4, "value_bits": 4}}).layouts(64, 30)
    assert sum(lay.record_bytes for lay in layouts) == sum(lay.record_bytes for lay in uniform)
    assert config.layers and all(2 <= lay.key_bits <= 6 for lay in layouts)


def test_calibrate_layer_bits_refuses_outlier_flags_and_bad_bits():
    from tq_vllm.tools.cli import main

    with pytest.raises(SystemExit, match="--channels sets outlier channels"):
        main(["calibrate", "x.yaml", "--layer-bits", "--channels", "8"])
    with pytest.raises(SystemExit, match="key_bits"):
        main(["calibrate", "x.yaml", "--layer-bits", "--key-bits", "9"])


def test_the_embedded_models_preset_stores_k4v4_bytes():
    """configs/smollm2-k4v4-layers.yaml (`calibrate --layer-bits` on the embedded model): K4 V4's
    68 bytes per token and KV head on average, keys one bit richer than values on the whole."""
    config = load_config({"turboquant": {"config": "smollm2-k4v4-layers"}})
    layouts = config.layouts(64, 30)
    assert sum(lay.record_bytes for lay in layouts) == 30 * 68
    assert len({lay.record_bytes for lay in layouts}) > 1  # not uniform
    keys, values = (
        sum(getattr(lay, f) for lay in layouts) / 30 for f in ("key_bits", "value_bits")
    )
    assert (keys, values) == (4.8, 3.2)
