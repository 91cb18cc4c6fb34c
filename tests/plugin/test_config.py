import pytest
import yaml

from tq_vllm.plugin.config import CONFIG_DIR, ConfigError, TurboQuantConfig, load_config

PRESETS = ["k8v4", "k6v5", "k6v4", "k4v4", "k4v3", "k3v3", "k2v2"]


def test_default_and_presets_load():
    assert (CONFIG_DIR / "default.yaml").is_file()
    for name in PRESETS:
        cfg = load_config({"turboquant": {"config": name}})
        assert f"k{cfg.key_bits}v{cfg.value_bits}" == name
    windowed = load_config({"turboquant": {"config": "k5v4-w32"}})
    assert (windowed.key_bits, windowed.value_bits, windowed.exact_window) == (5, 4, 32)


def test_sources_override_in_order(tmp_path, monkeypatch):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("key_bits: 2\nvalue_bits: 2\nseed: 5\n")
    monkeypatch.setenv("TQ_VLLM_CONFIG", str(env_file))
    cfg = load_config({"turboquant": {"config": str(CONFIG_DIR / "k4v4.yaml"), "value_bits": 3}})
    assert (cfg.key_bits, cfg.value_bits) == (4, 3)
    assert cfg.seed == 0  # k4v4.yaml sets it, after the environment's file
    assert load_config().seed == 5


def test_layer_overrides_and_padding():
    cfg = TurboQuantConfig(
        key_bits=3,
        value_bits=3,
        keep_first_layers=1,
        keep_last_layers=1,
        keep_key_bits=4,
        keep_value_bits=4,
        layers={5: {"value_bits": 2}},
    )
    bits = [cfg.layer_bits(i, 30) for i in range(30)]
    assert (bits[0].key_bits, bits[29].value_bits, bits[1].key_bits) == (4, 4, 3)
    assert bits[5].value_bits == 2
    layouts = cfg.layouts(64, 30)
    sizes = [layout.record_bytes for layout in layouts]  # each layer at its own size
    assert (sizes[0], sizes[1], sizes[5], sizes[29]) == (68, 52, 44, 68)
    assert set(sizes[6:29]) == {52}
    text = cfg.describe(64, 30)
    assert "52 bytes per token per KV head" in text
    assert "layer 0: 68, layer 5: 44, layer 29: 68 bytes" in text
    mean = (27 * 52 + 2 * 68 + 44) / 30
    assert f"{256 / mean:.2f}x over all 30 layers" in text
    assert TurboQuantConfig(layers={-1: {"key_bits": 8}}).layer_bits(29, 30).key_bits == 8


@pytest.mark.parametrize(
    "inline,field",
    [
        ({"key_bits": 9}, "key_bits"),
        ({"value_bits": 0}, "value_bits"),
        ({"key_mode": "exact"}, "key_mode"),
        ({"keybits": 3}, "keybits"),
        ({"layers": {"3": {"bits": 2}}}, "bits"),
        ({"layers": {"x": {"key_bits": 2}}}, "'x'"),
        ({"seed": -3}, "seed"),
        ({"key_mode": "prod", "key_bits": 1}, "key_bits"),
        ({"config": "/nonexistent/file.yaml"}, "config"),
        ({"sparse_v": 1.0}, "sparse_v"),
        ({"sparse_v": -0.1}, "sparse_v"),
        ({"sparse_v": "1e-3"}, "sparse_v"),
        ({"exact_window": 24}, "exact_window"),
        ({"exact_window": 512}, "exact_window"),
        ({"exact_window": True}, "exact_window"),
        ({"exact_window": "32"}, "exact_window"),
        ({"window_prefill": "rule"}, "window_prefill"),
    ],
)
def test_bad_configs_name_the_field(inline, field):
    with pytest.raises(ConfigError, match=field):
        load_config({"turboquant": inline})


def test_sparse_v_is_off_by_default_and_said_when_on():
    assert load_config({}).sparse_v == 0
    assert "sparse V" not in load_config({}).describe(64, 30)
    config = load_config({"turboquant": {"sparse_v": 0.001}})
    assert config.sparse_v == 0.001 and "sparse V: value tiles below 0.001" in config.describe(
        64, 30
    )


def test_exact_window_is_on_by_default_and_its_memory_said():
    """The default's window stays under inline keys that do not name it; the other presets
    set it to 0."""
    text = load_config({}).describe(64, 30)
    assert (
        "each query's newest tokens (up to 32) in the model dtype, 8192 bytes per request" in text
    )
    assert load_config({"turboquant": {"key_bits": 4, "value_bits": 4}}).exact_window == 32
    assert load_config({"turboquant": {"config": "k4v4"}}).exact_window == 0
    assert "exact window" not in load_config({"turboquant": {"exact_window": 0}}).describe(64, 30)
    assert "prefill chunks read as 'chunk'" in text  # the default; the eval asks for 'decode'
    decode = load_config({"turboquant": {"window_prefill": "decode"}})
    assert "prefill chunks read as 'decode'" in decode.describe(64, 30)


def test_bad_yaml_and_layer_range(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("key_bits: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config({"turboquant": {"config": str(bad)}})
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config({"turboquant": {"config": str(bad)}})
    with pytest.raises(ConfigError, match=r"layers\[40\]"):
        TurboQuantConfig(layers={40: {"key_bits": 2}}).layouts(64, 30)


@pytest.mark.parametrize(
    "inline,field",
    [
        ({"key_bits": "3"}, "key_bits"),  # YAML/JSON strings are not numbers
        ({"value_bits": 2.0}, "value_bits"),
        ({"key_bits": True}, "key_bits"),
        ({"keep_key_bits": 9}, "keep_key_bits"),
        ({"keep_first_layers": -1}, "keep_first_layers"),
        ({"seed": True}, "seed"),
        ({"key_mode": None}, "key_mode"),
        ({"layers": [1, 2]}, "layers"),
        ({"layers": {3: 5}}, r"layers\[3\]"),
        ({"layers": {-1: {"key_mode": "prod", "key_bits": 1}}}, "key_bits"),
    ],
)
def test_malformed_configs_name_the_field(inline, field):
    with pytest.raises(ConfigError, match=field):
        load_config({"turboquant": inline}).layouts(64, 30)


@pytest.mark.parametrize(
    "inline,message",
    [
        ({"keep_first_layers": 20, "keep_last_layers": 11}, r"keep_first_layers \(20\) \+ keep_"),
        ({"layers": {0: {"key_bits": 2}, -30: {"key_bits": 4}}}, r"layers\[0\] and layers\[-30\]"),
    ],
)
def test_contradictory_configs_refused_for_the_model(inline, message):
    """Contradictions that only the model's layer count reveals: refused when the layouts are
    built (at engine start), naming both fields."""
    cfg = load_config({"turboquant": inline})
    with pytest.raises(ConfigError, match=message):
        cfg.layouts(64, 30)
    cfg.layouts(64, 64)  # a deeper model has room for both


def test_layer_override_beats_keep_layers():
    """Not a contradiction: `layers` is the documented last word for the layers it names."""
    cfg = TurboQuantConfig(keep_first_layers=2, layers={0: {"key_bits": 2}})
    assert cfg.layer_bits(0, 30).key_bits == 2
    assert cfg.layer_bits(1, 30).key_bits == cfg.keep_key_bits


def outlier_channels(layers=30, heads=3, count=16):
    return [[list(range(h, h + count)) for h in range(heads)] for _ in range(layers)]


@pytest.mark.parametrize(
    "inline,message",
    [
        ({"key_outlier_bits": 4}, "needs key_outlier_channels"),
        ({"key_outlier_channels": outlier_channels()}, "key_outlier_bits is 0"),
        ({"key_outlier_bits": 9, "key_outlier_channels": outlier_channels()}, "key_outlier_bits"),
        ({"key_outlier_bits": 4, "key_outlier_channels": [[[1, 2], [3]]]}, "all of one length"),
        ({"key_outlier_bits": 4, "key_outlier_channels": [[1, 2]]}, "per KV head"),
        ({"key_outlier_bits": 4, "key_outlier_channels": "0-15"}, "key_outlier_channels"),
    ],
)
def test_malformed_outlier_configs(inline, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"turboquant": inline})


@pytest.mark.parametrize(
    "channels,extra,message",
    [
        (outlier_channels(layers=24), {}, "lists 24 layers; the model has 30"),
        (outlier_channels(count=8), {}, "at least 16"),
        ([[[60 + i for i in range(16)]] * 3] * 30, {}, r"0\.\.63"),
        ([[[0] * 16] * 3] * 30, {}, "same outlier channel twice"),
        (outlier_channels(), {"key_mode": "prod"}, "key_mode 'mse'"),
        (outlier_channels(), {"layers": {3: {"key_mode": "prod"}}}, "layer 3: outlier"),
    ],
)
def test_outlier_configs_refused_for_the_model(channels, extra, message):
    cfg = TurboQuantConfig(key_outlier_bits=4, key_outlier_channels=channels, **extra)
    with pytest.raises(ConfigError, match=message):
        cfg.layouts(64, 30)


def test_outlier_config_layouts_and_description():
    cfg = TurboQuantConfig(
        key_bits=2, value_bits=3, key_outlier_bits=4, key_outlier_channels=outlier_channels()
    )
    layouts = cfg.layouts(64, 30)
    assert all((lay.key_outliers, lay.key_outlier_bits, lay.size) == (16, 4, 50) for lay in layouts)
    assert cfg.outlier_channels(2).tolist() == outlier_channels()[2]
    assert "K2 + 16 outlier channels at 4 bits = K2.5" in cfg.describe(64, 30)
    assert TurboQuantConfig().outlier_channels(0) is None


def test_outlier_channels_skip_layers_kept_at_more_bits():
    """keep_first_layers at 8-bit keys: those layers keep plain keys rather than lose their
    strongest channels to 4 bits."""
    cfg = TurboQuantConfig(
        key_bits=2, keep_first_layers=1, key_outlier_bits=4, key_outlier_channels=outlier_channels()
    )
    layouts = cfg.layouts(64, 30)
    assert not layouts[0].split_keys and all(lay.split_keys for lay in layouts[1:])


@pytest.mark.parametrize(
    "channels",
    [
        [[[0.5 + i for i in range(16)]] * 3] * 30,  # floats are not channel indices
        [[[True] * 16] * 3] * 30,
        [[list(range(16)), list(range(17))]] * 30,  # one head with more channels
        [[list(range(16))] * 3, [list(range(16))] * 2],  # a layer with fewer heads
    ],
)
def test_outlier_channel_lists_must_be_integer_and_regular(channels):
    with pytest.raises(ConfigError, match="channel-index lists of integers, all of one length"):
        TurboQuantConfig(key_outlier_bits=4, key_outlier_channels=channels)


def test_calibrated_preset_serves_the_embedded_model_shape_only():
    """configs/smollm2-k2.5v3.yaml (`tq-vllm calibrate` on the embedded model: 30 layers, 3 KV
    heads, head_dim 64): K2.5 V3 at 50 bytes; another layer count is refused."""
    cfg = load_config({"turboquant": {"config": "smollm2-k2.5v3"}})
    assert all(lay.split_keys and lay.size == 50 for lay in cfg.layouts(64, 30))
    assert [len(heads) for heads in cfg.key_outlier_channels] == [3] * 30
    with pytest.raises(ConfigError, match="lists 30 layers; the model has 24"):
        cfg.layouts(64, 24)
