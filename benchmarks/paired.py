"""Engines side by side, taking turns: the pairing behind decode_tpot.py and
offline_throughput.py.

Each config gets its own worker process (`script --worker SPEC`), which sets up its engine, says
READY, then answers each "run" line with one number. The engines stay up together and take
turns, the order alternating, so run i of every config happens within seconds of run i of
auto: on a VM whose speed drifts by 10-25% within minutes, each run's ratio to auto is a pair
measured on the same machine state. A worker runs vLLM's engine core in its own process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so that the engines' turns are the only switching.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import NoReturn


def serve(run: Callable[[], float]) -> None:
    """Worker side: READY, then one RESULT line per "run" line on stdin."""
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(f"RESULT {run()!r}", flush=True)


class Engine:
    """One config's worker process, set up and waiting for runs."""

    def __init__(self, script: str, spec: dict, env: dict[str, str]) -> None:
        # vLLM logs to stdout unless told otherwise: its lines go to the log file, replies stay.
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
                   VLLM_LOGGING_STREAM="ext://sys.stderr", **env)  # fmt: skip
        self.config = spec["config"]
        self.log = tempfile.TemporaryFile(mode="w+")  # vLLM's logs, shown if the worker fails
        self.proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip
        self._reply("READY")

    def _reply(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag) :].strip()
        self._failed()

    def _failed(self) -> NoReturn:
        self.proc.wait()
        self.log.seek(0)
        raise RuntimeError(f"{self.config} failed:\n{self.log.read()[-3000:]}")

    def run(self) -> float:
        try:
            self.proc.stdin.write("run\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # the worker died between runs
            self._failed()
        return float(self._reply("RESULT "))

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def alternate(
    script: str, configs: list[str], base: dict, repeats: int, env: dict[str, str] | None = None
) -> dict[str, list[float]]:
    """Each config's results, run i of each taken back to back, the order alternating."""
    engines = []
    try:
        for config in configs:  # one at a time: setting up takes both cores
            engines.append(Engine(script, {**base, "config": config}, env or {}))
        results: dict[str, list[float]] = {config: [] for config in configs}
        for i in range(repeats):
            for engine in engines if i % 2 == 0 else engines[::-1]:
                time.sleep(0.2)  # the other engine's OpenMP threads stop spinning
                results[engine.config].append(engine.run())
        return results
    finally:
        for engine in engines:
            engine.close()


def ratio_cells(results: dict[str, list[float]], lower_is_better: bool) -> dict[str, str]:
    """Per config, two table cells: 'median (range) | n of N', the ratios to auto's pairs and
    in how many pairs the config did better (auto: empty cells)."""
    cells = {}
    for config, values in results.items():
        ratios = [v / a for v, a in zip(values, results["auto"])]
        better = sum(r < 1 if lower_is_better else r > 1 for r in ratios)
        cells[config] = (
            " |"
            if config == "auto"
            else f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{better} of {len(ratios)}"
        )
    return cells
