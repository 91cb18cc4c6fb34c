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


def test_paired_ratio_counts_the_better_side():
    assert paired.paired_ratio([2, 4, 3], [1, 4, 4], lower_is_better=False) == (
        "1.00x (0.75-2.00) | 1 of 3"
    )
    assert paired.paired_ratio([2, 4, 3], [1, 4, 4], lower_is_better=True) == (
        "1.00x (0.75-2.00) | 1 of 3"
    )
