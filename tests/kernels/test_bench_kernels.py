"""benchmarks/bench_kernels.py --quick runs end to end (in the Triton interpreter here)."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


def test_bench_kernels_quick(capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "## store_kv" in out and "## decode" in out
    assert out.count("x |") == 8  # a speedup per (batch, context) cell and codebook
    assert "TQ memory us" in out and "TQ registers us" in out
