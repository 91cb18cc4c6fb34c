"""Fused CPU attention over the compressed paged cache (C++, csrc/cpu_attention.cpp).

Same contracts as attention_reference's decode_attention_reference and (for key = value =
None, the serving path) context_attention_reference. The kernel works in the rotated domain
like the Triton kernels: queries are rotated (and scaled) here, the C++ code scores packed keys
straight from the records and sums centroid values under an online softmax, and the output is
rotated back here. Threads: ATen's intra-op pool (torch.get_num_threads(), which vLLM sets).
store_kv writes the bytes store_kv_reference writes, packing the records in C++ without the
reference's dozens of small tensor ops. Prefill chunks of a 16-bit model take a dense path
instead: the C++ op dequantizes each sequence's cached tokens once (exactly the reference's
values, rounded to the model's dtype) and vLLM's own CPU attention kernel runs over them.

The extension is compiled at first use with torch.utils.cpp_extension into the tq_vllm cache
directory, keyed by the source, torch version and CPU (it is built with -march=native);
cpp_extension's lock file lets concurrent processes share one build. If it cannot be built,
available() logs why once and returns False, and ops.py keeps the PyTorch reference.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from tq_vllm import compat
from tq_vllm.centroids import cache_dir
from tq_vllm.codec import LayerCodec
from tq_vllm.kernels.attention_reference import context_attention_reference
from tq_vllm.kernels.decode import check_gqa
from tq_vllm.kernels.store import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_records,
    check_store_inputs,
    check_tensor,
)

logger = logging.getLogger("tq_vllm")
SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
# Query rows x GQA group of one context work item: each decoded token serves this many rows,
# and the item's accumulators (rows x head_dim floats) stay in L1/L2.
CONTEXT_ROWS = 64
# Sequences with at least this many new rows (16-bit queries) take the dense path: their
# cached tokens dequantized once, then a bf16 attention kernel (vLLM's, else SDPA), which
# outruns the fused float32 one per score.
DENSE_ROWS = 16


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build_directory() -> Path:
    key = SOURCE.read_bytes() + f"{torch.__version__}|{platform.machine()}|".encode()
    digest = hashlib.sha256(key + _cpu_fingerprint().encode()).hexdigest()[:16]
    return cache_dir() / "extensions" / f"cpu_attention-{digest}"


@functools.cache
def available() -> bool:
    """Builds (or loads the cached build of) the extension once per process."""
    try:
        from torch.utils import cpp_extension

        build = build_directory()
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name="tq_vllm_cpu_attention",
            sources=[str(SOURCE)],
            build_directory=str(build),
            extra_cflags=["-O3", "-march=native"],
            is_python_module=False,
        )
        return True
    except Exception as e:  # noqa: BLE001 - any build failure means: use the reference
        lines = str(e).strip().splitlines() or [""]
        # The compiler's first "error:" line says most; cpp_extension wraps it in its log.
        reason = next((line for line in lines if "error:" in line), lines[-1])
        logger.warning(
            "the fused CPU attention kernel could not be built (%s: %s); using the PyTorch "
            "reference instead (correct, slower)",
            type(e).__name__,
            reason.strip(),
        )
        return False


def _check(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    uniform_ok: bool = False,
) -> None:
    check_tensor("query", query, 3, FLOAT_DTYPES)
    check_records(kv_cache, codec, uniform_ok=uniform_ok, split_ok=True)
    check_tensor("block_table", block_table, 2, INDEX_DTYPES)
    check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES)
    check_gqa(query, kv_cache, codec)
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"block_table has {block_table.shape[0]} rows for {seq_lens.shape[0]} sequences"
        )


def _layout_fields(codec: LayerCodec) -> list[int]:
    """The record layout as the C++ ops take it (the store appends the residual norm's offset)."""
    layout = codec.layout
    return [
        layout.key_index_bits,
        int(layout.prod),
        layout.value_bits,
        layout.value_norm,
        layout.key_indices,
        layout.key_signs,
        layout.value_indices,
    ]


def _key_args(codec: LayerCodec) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """(key centroids, outlier centroids, outlier fields) as the C++ ops take them: for split
    keys the regular part's centroids, then the outlier part's, and its [count, bits, norm
    offset, indices offset]; for plain keys (centroids, None, [])."""
    layout = codec.layout
    if not layout.split_keys:
        return codec.key.centroids.float().contiguous(), None, []
    fields = [
        layout.key_outliers,
        layout.key_outlier_bits,
        layout.key_outlier_norm,
        layout.key_outlier_indices,
    ]
    regular, outlier = codec.key.regular.centroids, codec.key.outlier.centroids
    return regular.float().contiguous(), outlier.float().contiguous(), fields


def _run(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    rows_per_tile: int,
    num_splits: int,
) -> torch.Tensor:
    layout = codec.layout
    q = (codec.rotate_queries(query) * scale).contiguous()
    qs = (q @ codec.key.qjl.T).contiguous() if layout.prod else q
    key_centroids, outlier_centroids, outliers = _key_args(codec)
    out = torch.ops.tq_vllm_cpu.attention(
        q,
        qs,
        kv_cache,
        block_table.to(torch.int32),
        query_start_loc.to(torch.int32).contiguous(),
        seq_lens.to(torch.int32).contiguous(),
        key_centroids,
        codec.value.centroids.float().contiguous(),
        _layout_fields(codec),
        math.sqrt(math.pi / 2) / codec.head_dim,
        rows_per_tile,
        num_splits,
        outlier_centroids,
        outliers,
    )
    return codec.unrotate(out).to(query.dtype)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    num_splits: int = 0,
) -> torch.Tensor:
    """decode_attention_reference, fused: query [B, Hq, d] -> [B, Hq, d] in query's dtype.

    num_splits: context splits per (sequence, KV head), merged by log-sum-exp; 0 picks enough
    to give every thread about 4 work items, with splits of at least 256 tokens."""
    _check(query, kv_cache, block_table, seq_lens, codec)
    if query.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"{query.shape[0]} queries for {seq_lens.shape[0]} sequences")
    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    return _run(query, kv_cache, block_table, starts, seq_lens, codec, scale, 1, num_splits)


def context_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    scale: float,
    num_splits: int = 0,
) -> torch.Tensor:
    """context_attention_reference with key = value = None (the chunk's tokens already in
    kv_cache): query [T, Hq, d] -> [T, Hq, d] in query's dtype, causal. A sequence with at
    least DENSE_ROWS new rows of a 16-bit query takes the dense path (its keys and values
    rounded to that dtype); the others run fused, in float32."""
    _check(query, kv_cache, block_table, seq_lens, codec, uniform_ok=True)
    check_tensor("query_start_loc", query_start_loc, 1, INDEX_DTYPES)
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries for "
            f"{seq_lens.shape[0]} sequences (needs one more)"
        )
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    q_lens = [hi - lo for lo, hi in zip(starts, starts[1:])]
    dense = [b for b, n in enumerate(q_lens) if n >= DENSE_ROWS and _dense_ok(query, codec)]
    fused = [b for b, n in enumerate(q_lens) if n and b not in dense]
    rows = max(1, CONTEXT_ROWS // (query.shape[1] // kv_cache.shape[1]))

    def fused_attention(q, table, q_starts, q_lens):
        if codec.layout.uniform_values:  # no fused kernel reads uniform values
            return context_attention_reference(
                q, None, None, kv_cache, table, q_starts, q_lens, codec, scale
            )
        return _run(q, kv_cache, table, q_starts, q_lens, codec, scale, rows, num_splits)

    if not dense:
        return fused_attention(query, block_table, query_start_loc, seq_lens)
    out = torch.empty_like(query)
    picked = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in dense])
    out[picked] = _dense_attention(
        query[picked],
        kv_cache,
        block_table,
        dense,
        [q_lens[b] for b in dense],
        [lens[b] for b in dense],
        codec,
        scale,
    )
    if fused:  # the sequences with few new rows, together in one fused call
        picked = torch.cat([torch.arange(starts[b], starts[b + 1]) for b in fused])
        sub_starts = torch.tensor([0, *itertools.accumulate(q_lens[b] for b in fused)])
        out[picked] = fused_attention(
            query[picked], block_table[fused], sub_starts, seq_lens[fused]
        )
    return out


def _dense_ok(query: torch.Tensor, codec: LayerCodec) -> bool:
    # The dense path rounds keys and values to the query's dtype: only for 16-bit models,
    # whose own attention runs at that precision. Prod keys need their QJL term: fused only.
    # Uniform values (an eval baseline with no fused kernel) take it too.
    return query.dtype in (torch.bfloat16, torch.float16) and not codec.layout.prod


def _dense_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqs: list[int],
    q_lens: list[int],
    lens: list[int],
    codec: LayerCodec,
    scale: float,
) -> torch.Tensor:
    """The new rows query [T, Hq, d] of sequences `seqs`, q_lens[i] each, in order, over their
    lens[i] cached tokens (the rows' own are the last), causal: keys and values dequantized
    once to query's dtype, then vLLM's CPU attention kernel (compat.dense_attention), or SDPA
    where that cannot run."""
    layout = codec.layout
    if layout.uniform_values:  # levels 0 .. 2^b - 1, scaled and shifted per vector
        levels = torch.arange(1 << layout.value_bits, dtype=torch.float32)
    else:
        levels = codec.value.centroids.float().contiguous()
    key_centroids, outlier_centroids, outliers = _key_args(codec)
    keys, values = [], []
    for b, length in zip(seqs, lens):
        k, v = torch.ops.tq_vllm_cpu.dequantize(
            kv_cache,
            block_table[b].to(torch.int32).contiguous(),
            length,
            key_centroids,
            levels,
            _layout_fields(codec),
            layout.value_zero if layout.uniform_values else -1,
            codec.head_dim,
            query.dtype,
            outlier_centroids,
            outliers,
        )
        keys.append(k)
        values.append(v)
    q = codec.rotate_queries(query).to(query.dtype).contiguous()
    o = compat.dense_attention(q, keys, values, q_lens, scale)
    if o is None:
        o = torch.cat([_sdpa(qb, k, v, scale) for qb, k, v in zip(q.split(q_lens), keys, values)])
    if layout.uniform_values:  # unrotated values: the output is in the model's basis already
        return o
    return codec.unrotate(o).to(query.dtype)


def _sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, d], the last T of keys/values [Hk, L, d]'s positions, causal -> [T, Hq, d]."""
    t, length = q.shape[0], keys.shape[1]
    # 4-d inputs: with 3-d ones SDPA leaves its flash kernel for the slow math path.
    q, keys, values = q.transpose(0, 1)[None], keys[None], values[None]
    if t == length:  # the whole sequence is new: plain causal
        o = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        visible = torch.arange(length) <= torch.arange(length - t, length)[:, None]
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )
    return o[0].transpose(0, 1)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
) -> None:
    """store_kv_reference, fused: the same bytes (value_mode "uniform" and split keys have no
    fused store)."""
    check_records(kv_cache, codec)
    check_store_inputs(key, value, kv_cache, slot_mapping, codec)
    if slot_mapping.numel() == 0:
        return
    layout = codec.layout
    torch.ops.tq_vllm_cpu.store(
        key,
        value,
        kv_cache,
        slot_mapping,
        codec.rotation,
        codec.key.centroids,
        codec.key.boundaries,
        codec.key.qjl if layout.prod else None,
        codec.value.centroids,
        codec.value.boundaries,
        [*_layout_fields(codec), layout.key_residual_norm],
    )
