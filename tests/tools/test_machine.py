"""The CPU line every benchmark table carries, and the dtype it picks."""

from pathlib import Path

from tq_vllm.kernels import cpu_extension
from tq_vllm.tools import machine


def test_isa_and_dtype_follow_the_cpu_flags():
    name, flags = machine.cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert name and flags
    isa = machine.cpu_isa()
    assert isa == [f for f in machine.ISA_FLAGS if f in flags]
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert machine.best_cpu_dtype() == ("bfloat16" if native_bf16 else "float32")
    line = machine.describe("float32")
    assert line.startswith("CPU: ") and line.endswith("model dtype: float32")
    assert all(f in line for f in isa)
    assert f"C++ ops: {cpu_extension.chosen_variant()} build" in line
