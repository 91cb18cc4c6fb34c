"""benchmarks/bench_cpu.py runs end to end at tiny sizes, every row timed against the baseline."""

import importlib.util
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cpu.py"


def test_bench_cpu_tiny(capsys):
    spec = importlib.util.spec_from_file_location("bench_cpu", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--lens", "200", "--batch", "2", "--chunk", "160", "--repeat", "1"]
    bench.main([*args, "--builds", "portable", "--dtypes", "float32"])
    out = capsys.readouterr().out
    assert "C++ ops:" in out and "model dtype: float32" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("float32")]
    # A baseline row and a row per config for decode; a baseline and 3 per config for prefill
    # (store, attention, total).
    configs = len(bench.CONFIGS)
    assert configs == 4 and len(rows) == 1 + configs + 1 + 3 * configs
    ratios = [float(row[-1]) for row in rows]
    assert all(r > 0 for r in ratios) and ratios[0] == 1.0
    assert "TQ_VLLM_CPU_ISA" not in os.environ  # the build choice is left as it was
