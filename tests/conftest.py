import os

# Triton kernels run on CPU tensors in the interpreter; it must be set before triton loads.
# On a machine with a GPU, set TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault(
    "TQ_VLLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tq_vllm")
)

import pytest  # noqa: E402 - after the environment above

from tq_vllm.kernels import cpu_extension  # noqa: E402


@pytest.fixture(params=cpu_extension.runnable_variants())
def cpu_isa(request, monkeypatch):
    """Runs a test once per C++ build this CPU executes (AVX-512, AVX2, portable...)."""
    monkeypatch.setattr(cpu_extension, "chosen_variant", lambda: request.param)
    assert cpu_extension.available(), "the C++ CPU ops did not build (see the log)"
    return request.param
