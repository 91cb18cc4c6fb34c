"""Benchmark the Triton kernels on a CUDA GPU: store throughput, and decode time and achieved
HBM bandwidth against a bf16 paged decode baseline (a Triton split-K kernel of the same shape,
written here) measured in the same run.

    python benchmarks/bench_kernels.py              # the full tables (GPU)
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --quick   # tiny sizes, CPU smoke run

Needs only torch and triton (no vLLM anywhere in the import chain).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import triton
import triton.language as tl

from tq_vllm.kernels.common import CODEBOOKS
from tq_vllm.kernels.decode.triton_decode import (
    _decode_reduce_kernel,
    decode_attention,
    default_num_splits,
)
from tq_vllm.kernels.store.triton_store import store_kv
from tq_vllm.kernels.triton_tiles import LOG2E
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout


@triton.jit
def _bf16_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    seq_lens_ptr,
    o_ptr,
    lse_ptr,
    num_q_heads,
    num_splits,
    table_stride,
    cache_sb,
    cache_sh,
    cache_ss,
    block_size,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The baseline: decode.py's split kernel over a plain paged cache [NB, Hk, BS, D]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(num_tiles, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_tiles)
    g = tl.arange(0, GP)
    rows = b * num_q_heads + h * G + g
    d = tl.arange(0, D)
    q = tl.load(q_ptr + rows[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)
    m = tl.full([GP], float("-inf"), dtype=tl.float32)
    lsum = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    for tile in range(first, last):
        t = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        tmask = t < seq_len
        block = tl.load(table_ptr + b * table_stride + t // block_size, mask=tmask, other=0)
        base = block.to(tl.int64) * cache_sb + h * cache_sh + (t % block_size) * cache_ss
        k = tl.load(k_ptr + base[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        s = tl.where(tmask[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + base[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    nonempty = lsum > 0
    out = acc / tl.where(nonempty, lsum, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, lsum, 1.0)), float("-inf"))
    part = rows.to(tl.int64) * num_splits + split
    tl.store(o_ptr + part[:, None] * D + d[None, :], out, mask=(g < G)[:, None])
    tl.store(lse_ptr + part, lse, mask=g < G)


def baseline_decode(query, k_cache, v_cache, block_table, seq_lens, scale, num_splits, block_n):
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    q = (query.float() * (scale * LOG2E)).contiguous()
    partial = torch.empty(batch, num_q_heads, num_splits, head_dim, device=query.device)
    lse = torch.empty(batch, num_q_heads, num_splits, device=query.device)
    _bf16_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, partial, lse, num_q_heads, num_splits,
        block_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[2], G=group, GP=max(16, triton.next_power_of_2(group)), D=head_dim,
        BLOCK_N=block_n, num_stages=2,
    )  # fmt: skip
    out = torch.empty(batch, num_q_heads, head_dim, device=query.device)
    _decode_reduce_kernel[(batch * num_q_heads,)](
        partial, lse, out, lse, num_splits, D=head_dim, SP=triton.next_power_of_2(num_splits),
        WRITE_LSE=False,
    )  # fmt: skip
    return out.to(query.dtype)


def timed(fn, reps: int) -> float:
    """Median seconds per call (CUDA events on a GPU; wall clock in the interpreter)."""
    fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def random_records(codec: LayerCodec, num_blocks, num_kv_heads, block_size, device):
    """Random indices and signs with finite norms: decode time does not depend on the values,
    and this is much faster than quantizing millions of vectors."""
    layout = codec.layout
    cache = torch.randint(
        0, 256, (num_blocks, num_kv_heads, block_size, layout.record_bytes), dtype=torch.uint8,
        device=device,
    )  # fmt: skip
    norms = torch.rand(num_blocks, num_kv_heads, block_size, 3, device=device) + 0.5
    norm_bytes = norms.to(torch.float16).view(torch.uint8)  # [..., 6]: three fp16 norms
    cache[..., : layout.key_indices] = norm_bytes[..., : layout.key_indices]
    return cache


def paged_table(batch, context, block_size, num_blocks, device):
    per_seq = triton.cdiv(context, block_size)
    order = torch.randperm(num_blocks - 1, device=device)[: batch * per_seq] + 1
    return order.view(batch, per_seq).to(torch.int32)


def bench_store(codec, num_kv_heads, tokens, block_size, reps, device):
    d = codec.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = torch.randn(tokens, num_kv_heads, d, device=device, dtype=dtype)
    value = torch.randn(tokens, num_kv_heads, d, device=device, dtype=dtype)
    num_blocks = triton.cdiv(tokens, block_size) + 1
    cache = torch.zeros(
        num_blocks, num_kv_heads, block_size, codec.layout.record_bytes, dtype=torch.uint8,
        device=device,
    )  # fmt: skip
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens]
    sec = timed(lambda: store_kv(key, value, cache, slots, codec), reps)
    vectors = 2 * tokens * num_kv_heads
    moved = vectors * d * key.element_size() + tokens * num_kv_heads * codec.layout.size
    return sec, vectors / sec, moved / sec / 1e9


def bench_decode(
    codec, batch, context, num_kv_heads, group, block_size, reps, block_n, device, codebooks
):  # fmt: skip
    """(seconds and GB/s per codebook, bf16 seconds, bf16 GB/s) of one shape."""
    d = codec.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    per_seq = triton.cdiv(context, block_size)
    num_blocks = batch * per_seq + 1
    table = paged_table(batch, context, block_size, num_blocks, device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, num_kv_heads * group, d, device=device, dtype=dtype)
    scale = d**-0.5
    splits = default_num_splits(batch, num_kv_heads, per_seq * block_size, device)
    records = random_records(codec, num_blocks, num_kv_heads, block_size, device)
    tq_bytes = batch * context * num_kv_heads * codec.layout.record_bytes
    tq = []
    for codebook in codebooks:
        call = functools.partial(
            decode_attention, query, records, table, seq_lens, codec, scale, num_splits=splits,
            block_n=block_n, codebook=codebook,
        )  # fmt: skip
        sec = timed(call, reps)
        tq.append((sec, tq_bytes / sec / 1e9))
    shape = (num_blocks, num_kv_heads, block_size, d)
    k_cache = torch.randn(shape, device=device, dtype=dtype)
    v_cache = torch.randn(shape, device=device, dtype=dtype)
    base = timed(
        lambda: baseline_decode(query, k_cache, v_cache, table, seq_lens, scale, splits, block_n),
        reps,
    )
    base_bytes = batch * context * num_kv_heads * d * 2 * k_cache.element_size()
    return tq, base, base_bytes / base / 1e9


def check_baseline(device):
    """The baseline kernel against dense attention, so that its timings mean something."""
    d, hk, group, block_size, context = 64, 2, 3, 16, 37
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, hk, context, d, generator=gen)
    v = torch.randn(2, hk, context, d, generator=gen)
    q = torch.randn(2, hk * group, d, generator=gen)
    per_seq = triton.cdiv(context, block_size)
    table = torch.randperm(2 * per_seq, generator=gen).view(2, per_seq).int() + 1
    cache_k = torch.zeros(2 * per_seq + 1, hk, block_size, d)
    cache_v = torch.zeros_like(cache_k)
    pos = torch.arange(context)
    for b in range(2):
        cache_k[table[b, pos // block_size].long(), :, pos % block_size] = k[b].transpose(0, 1)
        cache_v[table[b, pos // block_size].long(), :, pos % block_size] = v[b].transpose(0, 1)
    lens = torch.full((2,), context, dtype=torch.int32)
    moved = [x.to(device) for x in (q, cache_k, cache_v, table, lens)]
    out = baseline_decode(*moved[:3], *moved[3:], d**-0.5, 3, 16).cpu()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale=d**-0.5
    ).squeeze(2)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU interpreter)")
    parser.add_argument("--key-bits", type=int, default=3)
    parser.add_argument("--key-mode", choices=("mse", "prod"), default="mse")
    parser.add_argument("--value-bits", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--gqa", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--block-n", type=int, default=32, help="tokens per decode tile")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--codebook", choices=(*CODEBOOKS, "both"), default="both",
        help="decode_attention's centroid lookups to time (both: side by side)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    codebooks = CODEBOOKS if args.codebook == "both" else (args.codebook,)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        batches, contexts, store_tokens, reps = [1, 2], [40, 64], 32, 1
        args.kv_heads = min(args.kv_heads, 2)
    else:
        if device.type != "cuda":
            parser.error("the full benchmark needs a CUDA GPU; use --quick in the interpreter")
        batches, contexts, store_tokens, reps = [1, 8, 32, 64], [1024, 8192, 32768], 8192, args.reps
    layout = RecordLayout(args.head_dim, args.key_bits, args.key_mode, args.value_bits)
    codec = LayerCodec(layout, seed=0, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    print(
        f"# {name}, triton {triton.__version__}: head_dim {args.head_dim}, {args.kv_heads} KV "
        f"heads, GQA {args.gqa}, block {args.block_size}, key {args.key_bits}-bit "
        f"{args.key_mode}, value {args.value_bits}-bit: {layout.record_bytes} B/token-head "
        f"(bf16: {4 * args.head_dim}, {layout.compression_ratio():.2f}x)"
    )
    check_baseline(device)

    sec, vps, gbs = bench_store(codec, args.kv_heads, store_tokens, args.block_size, reps, device)
    print(f"\n## store_kv, {store_tokens} tokens x {args.kv_heads} KV heads")
    print("| time (us) | vectors/s | GB/s (bf16 in + records out) |")
    print("|---|---|---|")
    print(f"| {sec * 1e6:.1f} | {vps:.3g} | {gbs:.1f} |")

    print("\n## decode: time per call (us) and achieved HBM bandwidth (GB/s)")
    tq_columns = "".join(f" TQ {c} us | GB/s | speedup (bf16 / TQ {c}) |" for c in codebooks)
    print(f"| batch | context | bf16 us | GB/s |{tq_columns}")
    print("|---|---|---|---|" + "---|---|---|" * len(codebooks))
    for batch in batches:
        for context in contexts:
            tq, base, base_gbs = bench_decode(
                codec, batch, context, args.kv_heads, args.gqa, args.block_size, reps,
                args.block_n, device, codebooks,
            )  # fmt: skip
            cells = "".join(f" {t * 1e6:.1f} | {gbs:.0f} | {base / t:.2f}x |" for t, gbs in tq)
            print(f"| {batch} | {context} | {base * 1e6:.1f} | {base_gbs:.0f} |{cells}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\n(ideal speedup at equal bandwidth: {layout.compression_ratio():.2f}x)")


if __name__ == "__main__":
    main()
