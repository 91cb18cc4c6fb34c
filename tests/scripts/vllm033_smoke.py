"""The plugin inside vLLM 0.33 (the CUDA wheel) on a machine without a GPU.

python vllm033_smoke.py: with vLLM's CUDA platform as the current platform, checks that the
plugin registers through register_kv_cache_dtype, that `--kv-cache-dtype turboquant` parses and
CacheConfig accepts it, that the CUDA platform's backend selection routes the dtype to our
backend (and refuses what it cannot serve, with the reason), that the backend class loads, how
CUDA graphs resolve, and that layers of different record sizes share one KV-cache group.
Prints one line per check; any failure raises.
"""

import sys
import types

import torch
import vllm
import vllm.platforms as platforms

# vLLM's CUDA platform module loads the compiled ops, which need the NVIDIA driver (libcuda)
# that a machine without a GPU lacks; the checks below call none of them.
sys.modules["vllm._C_stable_libtorch"] = types.ModuleType("vllm._C_stable_libtorch")
from vllm.platforms.cuda import CudaPlatform  # noqa: E402

platforms.current_platform = platforms._current_platform = CudaPlatform()

from vllm.config.cache import (  # noqa: E402
    KV_CACHE_DTYPES,
    CacheConfig,
    get_kv_cache_dtype_handler,
)
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402
from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.attention.selector import AttentionSelectorConfig  # noqa: E402
from vllm.v1.kv_cache_interface import KVQuantMode  # noqa: E402

import tq_vllm.plugin  # noqa: E402

assert vllm.__version__.startswith("0.33"), vllm.__version__
tq_vllm.plugin.register()
tq_vllm.plugin.register()  # idempotent
assert KV_CACHE_DTYPES.count("turboquant") == 1
assert get_kv_cache_dtype_handler("turboquant").quant_mode() == KVQuantMode.CUSTOM
assert STR_DTYPE_TO_TORCH_DTYPE["turboquant"] == torch.uint8
print("OK registered through register_kv_cache_dtype")

parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
assert parser.parse_args(["--kv-cache-dtype", "turboquant"]).kv_cache_dtype == "turboquant"
print("OK --kv-cache-dtype turboquant parses")
assert CacheConfig(cache_dtype="turboquant").cache_dtype == "turboquant"
print("OK CacheConfig accepts it")

path = tq_vllm.plugin.BACKEND_PATH
select = CudaPlatform.get_attn_backend_cls
for head_size in (64, 128, 256):
    config = AttentionSelectorConfig(head_size, torch.bfloat16, "turboquant", 16)
    assert select(None, config) == path, head_size
assert AttentionBackendEnum.CUSTOM.get_path() == path
print("OK the CUDA platform routes turboquant layers to", path)

refused = {
    "MLA attention is not supported": dict(use_mla=True),
    "head_size 96: the Triton kernels support": dict(head_size=96),
    "attention sinks is not supported": dict(has_sink=True),
}
for message, change in refused.items():
    config = AttentionSelectorConfig(128, torch.bfloat16, "turboquant", 16)._replace(**change)
    try:
        select(None, config)
    except ValueError as e:
        assert message in str(e), (message, str(e))
    else:
        raise AssertionError(f"not refused: {change}")
print("OK refusals:", "; ".join(refused))

from tq_vllm.plugin.backend import TurboQuantBackend  # noqa: E402
from tq_vllm.plugin.startup import unsupported_platform_reasons  # noqa: E402

assert TurboQuantBackend.get_name() == "CUSTOM"
assert unsupported_platform_reasons(platforms.current_platform, {}) == []
assert CudaPlatform.check_and_update_config._tq_vllm_validated  # the startup check's hook
print("OK the backend class loads; the CUDA platform passes the startup check")

# CUDA graphs. By default the builder declares no support (AttentionCGSupport.NEVER), so with
# the splitting ops an engine sets, vLLM's default FULL_AND_PIECEWISE (and FULL_DECODE_ONLY)
# resolve to PIECEWISE: the layers between attention calls run as captured graphs, attention
# eagerly. With TQ_VLLM_CUDA_GRAPHS=full it declares UNIFORM_SINGLE_TOKEN_DECODE, and both modes
# stay as asked: decode-only steps are captured whole, attention included.
import os  # noqa: E402

from vllm.config.compilation import CompilationConfig, CompilationMode, CUDAGraphMode  # noqa: E402

from tq_vllm.plugin.backend import TurboQuantMetadataBuilder  # noqa: E402
from tq_vllm.plugin.startup import CUDA_GRAPHS_ENV  # noqa: E402

for graphs in ("piecewise", "full"):
    os.environ[CUDA_GRAPHS_ENV] = graphs
    support = TurboQuantMetadataBuilder.get_cudagraph_support(None, None)
    for requested in (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY):
        compilation = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=requested)
        compilation.set_splitting_ops_for_v1("allgather_reducescatter")
        resolved = compilation.resolve_cudagraph_mode_and_sizes(support, "CUSTOM", max_num_reqs=8)
        want = requested if graphs == "full" else CUDAGraphMode.PIECEWISE
        assert resolved == want, (graphs, requested, resolved)
    print(
        f"OK CUDA graphs, {CUDA_GRAPHS_ENV}={graphs}: FULL_AND_PIECEWISE and FULL_DECODE_ONLY "
        f"resolve to {'themselves' if graphs == 'full' else 'PIECEWISE'}"
    )
del os.environ[CUDA_GRAPHS_ENV]

# Per-layer record sizes: compat.size_pages_per_layer wraps Attention.get_kv_cache_spec (whose
# module cannot be imported without the CUDA extensions: its signature is read from the source)
# to give each layer its record size; vLLM must then put full-attention layers of different page
# sizes in one KV-cache group.
import importlib.util  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from vllm.v1.core.kv_cache_planning import get_kv_cache_groups  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs  # noqa: E402

layers_module = importlib.util.find_spec("vllm.model_executor.layers.attention")
source = (Path(layers_module.origin).parent / "attention.py").read_text()
assert "def get_kv_cache_spec(self, vllm_config: VllmConfig)" in source
assert "self.kv_cache_dtype = kv_cache_dtype" in source and "self.layer_name = prefix" in source
block, records = 16, (132, 68, 68)
spec = FullAttentionSpec(block_size=block, num_kv_heads=2, head_size=128, dtype=torch.uint8)
specs = {
    f"model.layers.{i}.self_attn.attn": TurboQuantBackend.customize_spec(
        replace(spec, state_content_bytes=size)
    )
    for i, size in enumerate(records)
}
assert [s.page_size_bytes for s in specs.values()] == [2 * block * size for size in records]
vllm_config = SimpleNamespace(
    scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=False)
)
(group,) = get_kv_cache_groups(vllm_config, specs)
assert isinstance(group.kv_cache_spec, UniformTypeKVCacheSpecs), group
assert group.kv_cache_spec.page_size_bytes == 2 * block * sum(records)
print("OK per-layer record sizes: one KV-cache group, each layer's page at its own size")

# exact_window (the default config's 32 tokens) on CUDA: vLLM's default block size, 16, holds
# neither a segment nor a ring's worth of records. The startup check grows it, and the backend
# asks for the same once the model is built, which is when vLLM's CUDA platform settles it
# (update_block_size_for_backend). activate() would also wrap vLLM's Attention class, whose
# module needs the CUDA extensions: a no-op stands in for that part here.
from tq_vllm.plugin import compat, startup  # noqa: E402
from tq_vllm.plugin.exact_ring import RingBackend  # noqa: E402

compat.size_pages_per_layer = lambda record_bytes: None
model = SimpleNamespace(get_head_size=lambda: 128, get_total_num_hidden_layers=lambda: 32)
blocks = {}
for name, additional in (("default", {}), ("k6v5", {"turboquant": {"config": "k6v5"}})):
    cache = CacheConfig(cache_dtype="turboquant")
    assert (cache.block_size, cache.user_specified_block_size) == (16, False)
    vllm_config = SimpleNamespace(
        additional_config=additional, model_config=model, cache_config=cache,
        speculative_config=None,
    )  # fmt: skip
    startup.choose_window_block(vllm_config, startup.activate(vllm_config))
    backends = [TurboQuantBackend, RingBackend] if name == "default" else [TurboQuantBackend]
    preferred = CudaPlatform._preferred_block_size_for_backends(backends, 16, vllm_config)
    blocks[name] = (cache.block_size, preferred)
assert blocks == {"default": (128, 128), "k6v5": (16, 16)}, blocks
print("OK exact_window on CUDA: 128-token blocks (16 without a window)")
