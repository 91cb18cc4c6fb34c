"""benchmarks/paired.py: the engines' turns and the paired ratios (workers without vLLM)."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import paired  # noqa: E402


def test_engines_take_turns_in_alternating_order(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "import paired\n"
        "paired.serve(time.monotonic)  # each run answers when it ran\n"
    )
    when = paired.alternate(str(worker), ["auto", "a", "b"], {}, 4)
    assert all(len(times) == 4 for times in when.values())
    order = [config for _, config in sorted((t, c) for c, ts in when.items() for t in ts)]
    assert order == ["auto", "a", "b", "b", "a", "auto"] * 2


def test_ratio_cells_count_the_better_side():
    results = {"auto": [1, 4, 4], "a": [2, 4, 3]}
    assert paired.ratio_cells(results, lower_is_better=False) == {
        "auto": " |",
        "a": "1.00x (0.75-2.00) | 1 of 3",
    }
    assert paired.ratio_cells(results, lower_is_better=True)["a"] == "1.00x (0.75-2.00) | 1 of 3"
    results["a"] = [0.5, 2, 2]
    assert paired.ratio_cells(results, lower_is_better=True)["a"] == "0.50x (0.50-0.50) | 3 of 3"
