"""One eval measurement in its own process: one vLLM engine per config, freed when the process
ends (`python -m tq_vllm.tools.eval.worker SPEC`, started by run_in_subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from tq_vllm.tools.eval.configs import EvalConfig, all_configs, file_config, turboquant_fields
from tq_vllm.tools.eval.passkey import measure_retrieval
from tq_vllm.tools.eval.perplexity import measure_ppl

CHUNK = 128  # max_num_batched_tokens: the largest prefill chunk
MAX_MODEL_LEN = 8192
KV_CACHE_BYTES = 1 << 30


def engine(
    config: EvalConfig, chunk: int, channels: list | None = None, model: str | None = None
) -> Any:
    """An engine for `config` on `model` (a model folder; default: the embedded model)."""
    from vllm import LLM

    from tq_vllm.tools.model import ensure_default_model

    kwargs: dict[str, Any] = {}
    if config.turboquant is not None:
        kwargs["additional_config"] = {"turboquant": turboquant_fields(config, channels)}
    if config.skip_layers:
        kwargs["kv_cache_dtype_skip_layers"] = [str(i) for i in config.skip_layers]
    return LLM(
        model=model or str(ensure_default_model()),
        kv_cache_dtype=config.kv_cache_dtype,
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        enable_chunked_prefill=True,
        max_num_batched_tokens=chunk,
        # Prompt logprobs skip prefix-cache hits anyway; off, every prompt is computed.
        enable_prefix_caching=False,
        seed=0,
        **kwargs,
    )


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    config = file_config(spec["file"]) if "file" in spec else all_configs()[spec["config"]]
    if "skip_layers" in spec:  # e.g. ["sliding_window"]: vLLM's names for kinds of layers
        config = replace(config, skip_layers=tuple(spec["skip_layers"]))
    llm = engine(config, spec["chunk"], spec.get("channels"), spec.get("model"))
    result = {}
    if "ppl" in spec["tasks"]:
        result.update(measure_ppl(llm, spec["tokens"]))
    if "retrieval" in spec["tasks"]:
        result.update(measure_retrieval(llm, spec["trials"], tuple(spec["lengths"])))
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run_in_subprocess(spec: dict, log: Path) -> dict:
    """One measurement (spec: worker_main's argument, less the result path) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        with log.open("w") as out:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tq_vllm.tools.eval.worker",
                    json.dumps({**spec, "result": str(result)}),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(f"{spec} failed (exit {proc.returncode}); log {log}:\n{tail}")
        return json.loads(result.read_text())


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
