"""Startup refusals that need no engine: untested devices, the Triton, codebook and CUDA graph
switches, and what the exact window does not serve yet."""

from dataclasses import dataclass

import pytest

from tq_vllm.plugin.startup import (
    CUDA_GRAPHS_ENV,
    ConfigError,
    check_exact_window,
    check_full_graphs,
    unsupported_platform_reasons,
)


@dataclass
class Platform:
    """The four questions startup asks vLLM's current_platform (no such device here)."""

    device_type: str

    def is_cuda(self) -> bool:
        return self.device_type == "cuda"

    def is_rocm(self) -> bool:
        return self.device_type == "rocm"

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


@pytest.mark.parametrize(
    "device,message",
    [("rocm", "ROCm is not supported"), ("xpu", "device 'xpu' is not supported")],
)
def test_untested_devices_are_refused(device, message):
    (reason,) = unsupported_platform_reasons(Platform(device), {})
    assert message in reason


def test_cuda_and_cpu_are_served():
    assert unsupported_platform_reasons(Platform("cuda"), {}) == []
    assert unsupported_platform_reasons(Platform("cpu"), {}) == []


def test_the_triton_switch_on_cpu_needs_the_interpreter():
    switch = {"TQ_VLLM_KERNELS": "triton"}
    (reason,) = unsupported_platform_reasons(Platform("cpu"), switch)
    assert "TRITON_INTERPRET=1" in reason
    assert unsupported_platform_reasons(Platform("cpu"), {**switch, "TRITON_INTERPRET": "1"}) == []
    assert unsupported_platform_reasons(Platform("cuda"), switch) == []
    (reason,) = unsupported_platform_reasons(Platform("cpu"), {"TQ_VLLM_KERNELS": "cuda"})
    assert "'cuda' is unknown" in reason
    assert unsupported_platform_reasons(Platform("cpu"), {"TQ_VLLM_KERNELS": "reference"}) == []


def test_an_unknown_codebook_switch_is_refused():
    (reason,) = unsupported_platform_reasons(Platform("cuda"), {"TQ_VLLM_CODEBOOK": "smem"})
    assert "TQ_VLLM_CODEBOOK='smem' is unknown" in reason
    assert unsupported_platform_reasons(Platform("cuda"), {"TQ_VLLM_CODEBOOK": "registers"}) == []


def test_an_unknown_bf16_dots_switch_is_refused():
    (reason,) = unsupported_platform_reasons(Platform("cpu"), {"TQ_VLLM_BF16_DOTS": "yes"})
    assert "TQ_VLLM_BF16_DOTS='yes' is unknown" in reason
    for choice in ("0", "1"):
        assert unsupported_platform_reasons(Platform("cpu"), {"TQ_VLLM_BF16_DOTS": choice}) == []


def test_the_cuda_graphs_switch(monkeypatch):
    (reason,) = unsupported_platform_reasons(Platform("cuda"), {CUDA_GRAPHS_ENV: "always"})
    assert f"{CUDA_GRAPHS_ENV}='always' is unknown" in reason
    assert unsupported_platform_reasons(Platform("cuda"), {CUDA_GRAPHS_ENV: "full"}) == []
    with pytest.raises(ConfigError, match="ring metadata reads sequence lengths on the host"):
        check_full_graphs(16, {CUDA_GRAPHS_ENV: "full"})
    check_full_graphs(16, {CUDA_GRAPHS_ENV: "piecewise"})
    check_full_graphs(0, {CUDA_GRAPHS_ENV: "full"})
    pytest.importorskip("vllm")
    from vllm.v1.attention.backend import AttentionCGSupport

    from tq_vllm.plugin.backend import TurboQuantMetadataBuilder

    support = TurboQuantMetadataBuilder.get_cudagraph_support
    monkeypatch.delenv(CUDA_GRAPHS_ENV, raising=False)
    assert support(None, None) == AttentionCGSupport.NEVER
    monkeypatch.setenv(CUDA_GRAPHS_ENV, "full")
    assert support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


@pytest.mark.parametrize(
    "total,size,expected",
    [(3, 1, [[0, 1, 2]]), (3, 3, [[0], [1], [2]]), (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
     (2, 4, [[0], [0], [1], [1]])],
)  # fmt: skip
def test_each_rank_takes_its_kv_heads(total, size, expected):
    """Outlier channels under tensor parallelism: a rank's codec gets its own heads' lists."""
    pytest.importorskip("vllm")
    from tq_vllm.plugin.backend import local_kv_heads

    assert [local_kv_heads(total, rank, size) for rank in range(size)] == expected


def test_exact_window_must_divide_the_block_size():
    check_exact_window(32, 128)
    check_exact_window(0, 100)  # off
    check_exact_window(32, None)  # vLLM picks the block size later; the ring builder checks
    with pytest.raises(ConfigError, match="exact_window 32 must divide the block size"):
        check_exact_window(32, 16)
