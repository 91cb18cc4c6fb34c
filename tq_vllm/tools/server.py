"""Start a real vLLM OpenAI server (or engine script) in a subprocess and read what it reports.

Used by the tests, `tq-vllm capacity` and the benchmarks: every number comes from vLLM itself.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

KV_TOKENS = re.compile(r"KV cache size: ([\d,]+) tokens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kv_cache_tokens(log: str) -> int:
    """The KV-cache capacity vLLM reported in its log, in tokens."""
    found = KV_TOKENS.findall(log)
    if not found:
        raise ValueError("vLLM reported no KV cache size in this log")
    return int(found[-1].replace(",", ""))


def kv_cache_flags(name: str) -> list[str]:
    """vLLM flags for one KV config: a vLLM dtype (auto, fp8, ...) or a TurboQuant preset name."""
    if name == "auto" or name.startswith("fp8"):
        return ["--kv-cache-dtype", name]
    extra = {"turboquant": {"config": name}}
    return ["--kv-cache-dtype", "turboquant", "--additional-config", json.dumps(extra)]


class Server:
    """`with Server(flags) as s:` -> an OpenAI server on loopback, s.url ending in /v1."""

    def __init__(
        self,
        flags: list[str],
        env: dict[str, str] | None = None,
        model: str | None = None,
        timeout: float = 600,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.timeout = timeout
        self._log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        args = ["serve"] + ([model] if model else [])
        command = [
            sys.executable, "-m", "tq_vllm.tools.cli", *args,
            "--host", "127.0.0.1", "--port", str(self.port), *flags,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self) -> Server:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}:\n{self.log[-6000:]}"
                )
            try:
                with urllib.request.urlopen(self.url.replace("/v1", "/health"), timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not ready after {self.timeout} s:\n{self.log[-6000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            import signal

            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        Path(self._log.name).unlink(missing_ok=True)


def run_until_exit(flags: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """Start a server expected to refuse its config: (exit code, log)."""
    server = Server(flags, env=env, timeout=timeout)
    try:
        code = server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.stop()
        code = None
    log = server.log
    Path(server._log.name).unlink(missing_ok=True)
    return code, log
