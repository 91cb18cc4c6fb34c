"""Uniform value mode (upstream vLLM's value format), the eval's parts, and `tq-vllm eval --quick`
on the real engine."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from cases import dense, dequantized, make_cache

from tq_vllm.kernels.context.reference import context_attention_reference
from tq_vllm.kernels.decode.reference import decode_attention_reference
from tq_vllm.plugin.config import ConfigError, load_config
from tq_vllm.quant.outliers import SplitKeyQuantizer
from tq_vllm.quant.uniform import UniformQuantizer
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout, decode_records, encode_records
from tq_vllm.tools.eval.configs import all_configs, bytes_per_token, layer_layouts
from tq_vllm.tools.eval.fidelity import Capture, config_fidelity, outlier_channels, score_fidelity


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_uniform_round_trip_error_bound(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(200, 64, generator=gen) * torch.logspace(-3, 3, 200).unsqueeze(1)
    x[0] = 0.7  # a constant vector comes back exactly (up to the fp16 zero point)
    uq = UniformQuantizer(64, bits)
    codes = uq.quantize(x)
    assert codes.indices.shape == (200, 64 * bits // 8) and codes.scale.dtype == torch.float16
    x_hat = uq.dequantize(codes)
    lo, hi = x.amin(-1), x.amax(-1)
    scale, zero = codes.scale.float(), codes.zero.float()
    # Half a step, plus what fp16 rounding of zero and scale shifts the levels by.
    bound = 0.5 * scale + (lo - zero).abs() + uq.levels * ((hi - lo) / uq.levels - scale).abs()
    err = (x_hat - x).abs().amax(-1)
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-7)
    assert err[0] <= (x[0, 0] - zero[0]).abs() + 1e-7


def test_uniform_record_layout():
    layout = RecordLayout(64, 4, "mse", 4, value_mode="uniform")
    # upstream's 4-bit slot: key 32 + 2 (norm), value 32 + 2 (scale) + 2 (zero)
    assert layout.size == 70 and layout.uniform_values
    assert (layout.key_norm, layout.value_norm, layout.value_zero) == (0, 2, 4)
    assert (layout.key_indices, layout.value_indices) == (6, 38)
    default = RecordLayout(64, 4, "mse", 4)  # unchanged by the new mode
    assert (default.size, default.key_indices, default.uniform_values) == (68, 4, False)
    with pytest.raises(ValueError, match="value_mode"):
        RecordLayout(64, 4, "mse", 4, value_mode="lloyd")


def test_uniform_record_round_trip():
    layout = RecordLayout(64, 3, "prod", 3, value_mode="uniform").padded(64)
    codec = LayerCodec(layout, seed=0)
    k, v = torch.randn(4, 2, 64), torch.randn(4, 2, 64) * 5 + 1
    records = codec.encode(k, v)
    assert records.shape == (4, 2, 64) and torch.all(records[..., layout.size :] == 0)
    key, value = decode_records(layout, records)
    expected = codec.value.quantize(v)
    assert torch.equal(value.scale, expected.scale) and torch.equal(value.zero, expected.zero)
    assert torch.equal(value.indices, expected.indices)
    assert torch.equal(encode_records(layout, key, value), records)
    _, v_rot = codec.decode_rotated(records)
    torch.testing.assert_close(codec.unrotate(v_rot), codec.value.dequantize(expected))


def test_reference_attention_uniform_equals_dequantize_then_attend():
    codec = LayerCodec(RecordLayout(64, 4, "mse", 3, value_mode="uniform"), seed=0)
    lens, q_lens = [17, 40], [17, 5]
    cache, table, keys, values = make_cache(codec, lens, 16, 2, seed=1)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), 6, 64)
    out = context_attention_reference(
        query, None, None, cache, table, qsl, torch.tensor(lens), codec, 0.125
    )
    step = decode_attention_reference(
        query[qsl[1:] - 1], cache, table, torch.tensor(lens), codec, 0.125
    )
    for b, (length, ql) in enumerate(zip(lens, q_lens)):
        kd, vd = dequantized(codec, keys[b], values[b])
        ref = dense(query[qsl[b] : qsl[b + 1]], kd, vd, length - ql, 0.125)
        torch.testing.assert_close(out[qsl[b] : qsl[b + 1]].double(), ref, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(step[b].double(), ref[-1], atol=2e-4, rtol=2e-4)


def test_value_mode_config():
    config = load_config({"turboquant": {"key_bits": 4, "value_bits": 4, "value_mode": "uniform"}})
    assert all(layout.uniform_values for layout in config.layouts(64, 30))
    assert "V4 (uniform)" in config.describe(64, 30)
    mixed = load_config({"turboquant": {"layers": {"-1": {"value_mode": "uniform"}}}})
    layouts = mixed.layouts(64, 30)
    assert [layout.uniform_values for layout in layouts] == [False] * 29 + [True]
    # each layer at its own size (the default's K5 V3: 68 bytes): the uniform layer's record
    # holds a zero point more
    assert [lay.record_bytes for lay in layouts] == [68] * 29 + [70]
    with pytest.raises(ConfigError, match="value_mode must be one of"):
        load_config({"turboquant": {"value_mode": "int4"}})
    with pytest.raises(ConfigError, match=r"layers\[2\].value_mode"):
        load_config({"turboquant": {"layers": {2: {"value_mode": "x"}}}})


def test_fidelity_scores():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 64, 32, generator=gen), torch.randn(2, 64, 32, generator=gen)
    cap, rows = Capture([q], [k]), torch.arange(32, 64)
    exact = cap.exact_scores(0, rows)
    dense_scores = torch.einsum("hrd,hld->hrl", q[:, rows], k.repeat_interleave(3, 0))
    torch.testing.assert_close(exact, dense_scores)
    same = score_fidelity(exact, cap.scores(0, k, rows), rows)
    assert (same.cosine, same.top1, same.top5) == pytest.approx((1.0, 1.0, 1.0))
    noisy_keys = k + 0.5 * torch.randn(k.shape, generator=gen)
    noisy = score_fidelity(exact, cap.scores(0, noisy_keys, rows), rows)
    assert 0.5 < noisy.cosine < 0.99 and noisy.top1 < 1 and noisy.top5 < 1
    kept = config_fidelity(cap, [None], seed=0, num_queries=16)  # bf16-kept layer: exact
    assert (kept[0].cosine, kept[0].top1, kept[0].top5) == (1.0, 1.0, 1.0)


def test_passkey_prompts_lengths():
    from transformers import AutoTokenizer

    from tq_vllm.tools.eval.data import passkey_prompts
    from tq_vllm.tools.model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    prompts = passkey_prompts(tokenizer, (1024, 2048), 9)
    assert len(prompts) == 18 and len({p["key"] for p in prompts}) == 18
    for p in prompts:
        assert p["length"] - 40 <= len(p["ids"]) <= p["length"]
        assert p["key"] in tokenizer.decode(p["ids"])


@pytest.mark.server
def test_quick_eval_keeps_default_bound(tmp_path):
    pytest.importorskip("vllm")
    """The promised bound, and K4 V4 with an exact window, whose rings vLLM counts. (The
    calibrated K2.5 V3 preset is served in test_triton_engine.py and test_serving.py's TP3
    test; its perplexity is the full eval's: on this window +32.6% at 5.12x.)"""
    command = [
        sys.executable,
        "-m",
        "tq_vllm.tools.cli",
        "eval",
        "--quick",
        "default",
        "k4v4-w32",
    ]
    command += ["--out", str(tmp_path)]
    # Its own session: on timeout the whole group goes, the engine process included.
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "OK: default" in stdout
    table = (tmp_path / "quality.md").read_text()
    assert "| bf16 |" in table and "| default |" in table
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    rows = {r["config"]["name"]: r for r in json.loads((tmp_path / "quality.json").read_text())}
    assert sum(rows["default"]["retrieval"]["1024"]) > 0  # the passkey is found at all
    bf16 = rows["bf16"]
    # Capacity for 2K-token conversations by vLLM's count: each conversation's 16 blocks of
    # records take a 17th for its ring (the default's window is 32 tokens too).
    default, windowed = rows["default"], rows["k4v4-w32"]
    for row, blocks in ((default, 17), (windowed, 17)):
        by_bytes = bf16["bytes_per_token"] / row["bytes_per_token"] * 16 / blocks
        ratio = row["conversations"] / bf16["conversations"]
        assert ratio == pytest.approx(by_bytes, rel=0.01), (row["config"]["name"], ratio)
    assert windowed["ppl"] < 1.05 * bf16["ppl"]  # K4 V4 alone: +7.6% on 8K tokens
    # Every prompt token scored as a decode step at its position reads, whatever the chunking.
    logs = [p.read_text() for p in (tmp_path / "quality_runs").glob("default.*.log")]
    assert logs and all("prefill chunks read as 'decode'" in log for log in logs)


def test_ops_read_uniform_records_with_the_reference():
    """Kernels read Lloyd-Max value records only: dispatch.py must route uniform layouts to the
    PyTorch reference (RecordLayout.uniform_values)."""
    from tq_vllm.kernels import dispatch

    codec = LayerCodec(RecordLayout(64, 4, "mse", 4, value_mode="uniform"), seed=0)
    lens, q_lens = [40, 17], [1, 17]
    cache, table, _, _ = make_cache(codec, lens, 16, 1, seed=2)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), 3, 64)
    args = (query, None, None, cache, table, qsl, torch.tensor(lens), codec, 0.125)
    torch.testing.assert_close(
        dispatch.context_attention(*args), context_attention_reference(*args)
    )
    decode = (query[:2], cache, table, torch.tensor(lens), codec, 0.125)
    torch.testing.assert_close(
        dispatch.decode_attention(*decode), decode_attention_reference(*decode)
    )


def test_outlier_channels_and_split_estimate():
    """Keys whose channels 3, 10, ... carry 10x the scale: calibration finds exactly those, and
    quantizing them apart at more bits reconstructs the keys better than the same bits spent
    on a random split."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randperm(64, generator=gen)[:16]
    scale = torch.ones(64)
    scale[big] = 10.0
    keys = torch.randn(256, 2, 64, generator=gen) * scale
    channels = outlier_channels(Capture([keys.transpose(0, 1)], [keys.transpose(0, 1)]), 16)
    assert channels[0].shape == (2, 16)
    assert all(set(channels[0][h].tolist()) == set(big.tolist()) for h in range(2))
    shuffled = torch.stack([torch.randperm(64, generator=gen)[:16] for _ in range(2)])
    errors = []
    for chosen in (channels[0], shuffled):
        split = SplitKeyQuantizer(64, 2, 4, chosen)
        errors.append(float(((split.dequantize(split.quantize(keys)) - keys) ** 2).sum()))
    assert errors[0] < 0.5 * errors[1]


def test_outlier_configs_bytes():
    configs = all_configs()
    split, plain = configs["k2.5v3-outliers"], configs["k3v3"]
    assert split.calibrated and not plain.calibrated
    with pytest.raises(ConfigError, match="needs key_outlier_channels"):
        layer_layouts(split, 64, 30)
    gen = torch.Generator().manual_seed(0)
    channels = [[torch.randperm(64, generator=gen)[:16].tolist() for _ in range(3)]] * 30
    layouts = layer_layouts(split, 64, 30, channels)
    assert all(lay.split_keys and lay.key_outlier_bits == 4 for lay in layouts)
    # per record: 16 indices at 4 bits (8 B) + 48 at 2 (12 B) + a second norm (2 B), against
    # 64 at 3 bits (24 B): 2 bytes less than K3 V3 per head and layer
    assert (
        bytes_per_token(layouts, 64, 3)
        == bytes_per_token(layer_layouts(plain, 64, 30), 64, 3) - 3 * 30 * 2
    )


def test_time_budget_must_be_positive(capsys):
    from tq_vllm.tools.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--time-budget", "0"])
    assert "--time-budget: must be more than 0 minutes, got 0" in capsys.readouterr().err


def test_capacity_is_counted_in_conversations_where_vllm_ran():
    """The default's rule ranks by vLLM's concurrency for 2K-token conversations, which counts an
    exact window's rings; the bytes per token do not, and overstate a windowed config."""
    from tq_vllm.tools.eval.report import Row, best_at, choose_default

    configs = all_configs()
    passkey = {"1024": [1, 1]}

    def row(name, nbytes, conversations, ppl):
        return Row(configs[name], nbytes, 1, ppl, 100, passkey, conversations=conversations)

    base = row("bf16", 23040, 22.75, 10.0)
    plain = row("k4v4", 6120, 85.6, 10.05)  # 3.76x
    windowed = row("k4v4-w32", 6120, 80.6, 10.08)  # 3.76x by bytes, 3.54x counted
    assert windowed.capacity(base) == pytest.approx(80.6 / 22.75)
    assert choose_default([base, windowed, plain], base, 0.01) is plain
    assert best_at([base, windowed, plain], base, 3.6) is plain
    unmeasured = row("k4v4-w16", 6120, None, 10.01)
    assert unmeasured.capacity(base) == pytest.approx(23040 / 6120)  # no engine: bytes
