"""Benchmark the C++ CPU ops per ISA build: one decode step of one layer (fused attention over
the compressed paged cache) and one prefill chunk's store and dequantize, against vLLM's own CPU
attention kernel over a plain paged cache in the model's dtype, measured in the same run.

    python benchmarks/bench_cpu.py [--lens 2048 8192] [--batch 8] [--builds avx2 portable]

The shape is the embedded model's (SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64). Every
row names the build; the table's header names the CPU, its ISA and the thread count. Ratios:
the baseline's time over the row's (above 1: faster than the model dtype).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from tq_vllm.kernels import cpu_extension
from tq_vllm.kernels.context.dense import (
    dense_attention,
    paged_dense_attention,
    paged_dense_cache,
)
from tq_vllm.kernels.decode.cpu_decode import decode_attention
from tq_vllm.kernels.store.cpu_store import store_kv
from tq_vllm.record.codec import LayerCodec
from tq_vllm.record.layout import RecordLayout
from tq_vllm.tools.machine import describe

HQ, HK, D, BLOCK = 9, 3, 64, 128
SCALE = D**-0.5
CONFIGS = {  # name: (key bits, value bits, outlier channels per KV head at 4 bits)
    "K6 V5": (6, 5, 0),
    "K5 V3": (5, 3, 0),  # the default's records (its exact window is not timed here)
    "K4 V4": (4, 4, 0),
    "K2.5 V3": (2, 3, 16),
}


def make_codec(key_bits: int, value_bits: int, outliers: int) -> LayerCodec:
    if not outliers:
        return LayerCodec(RecordLayout(D, key_bits, "mse", value_bits), seed=0)
    layout = RecordLayout(D, key_bits, "mse", value_bits, key_outliers=outliers,
                          key_outlier_bits=4)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    channels = torch.stack([torch.randperm(D, generator=gen)[:outliers] for _ in range(HK)])
    return LayerCodec(layout, 0, None, channels)


def timed(repeat: int, fn, *args) -> float:
    """Median seconds of fn(*args) over `repeat` calls, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sequences(batch: int, length: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(1)
    keys = [torch.randn(HK, length, D, generator=gen).to(dtype) for _ in range(batch)]
    values = [torch.randn(HK, length, D, generator=gen).to(dtype) for _ in range(batch)]
    query = torch.randn(batch, HQ, D, generator=gen).to(dtype)
    return query, keys, values


def compressed_cache(codec: LayerCodec, keys, values, length: int):
    per_seq = -(-length // BLOCK)
    cache = torch.zeros(len(keys) * per_seq, HK, BLOCK, codec.layout.record_bytes,
                        dtype=torch.uint8)  # fmt: skip
    table = torch.arange(len(keys) * per_seq, dtype=torch.int32).view(len(keys), per_seq)
    for b, (k, v) in enumerate(zip(keys, values)):
        slots = torch.arange(length) + b * per_seq * BLOCK
        store_kv(k.transpose(0, 1).float(), v.transpose(0, 1).float(), cache, slots, codec)
    return cache, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk tokens")
    parser.add_argument("--builds", nargs="+", default=cpu_extension.runnable_variants())
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    forced = os.environ.get(cpu_extension.ISA_ENV)
    try:
        run(args)
    finally:  # the caller's choice of build, as it was
        use_build(forced)


def use_build(build: str | None) -> None:
    if build is None:
        os.environ.pop(cpu_extension.ISA_ENV, None)
    else:
        os.environ[cpu_extension.ISA_ENV] = build


def run(args: argparse.Namespace) -> None:
    print(f"# {describe(', '.join(args.dtypes))}; {torch.get_num_threads()} threads")
    print(f"# shape: Hq {HQ}, Hk {HK}, d {D}, block {BLOCK}, batch {args.batch}")
    print("# decode: one layer-step of batch x 1 query; prefill: one chunk's store + dequantize")
    print(f"{'dtype':9} {'build':12} {'config':16} {'what':22} {'ms':>8} {'x baseline':>10}")
    for dtype in [getattr(torch, name) for name in args.dtypes]:
        for length in args.lens:
            query, keys, values = sequences(args.batch, length, dtype)
            dense = paged_dense_cache(keys, values)
            lens = torch.full((args.batch,), length, dtype=torch.int32)
            base = timed(args.repeat, paged_dense_attention, query, dense, [1] * args.batch, SCALE)
            what = f"decode {length}"
            print(f"{str(dtype)[6:]:9} {'vLLM':12} {'model dtype':16} {what:22} "
                  f"{base * 1e3:8.2f} {1.0:10.2f}")  # fmt: skip
            for build in args.builds:
                use_build(build)
                for name, bits in CONFIGS.items():
                    codec = make_codec(*bits)
                    cache, table = compressed_cache(codec, keys, values, length)
                    t = timed(
                        args.repeat, decode_attention, query, cache, table, lens, codec, SCALE
                    )
                    print(f"{str(dtype)[6:]:9} {build:12} {name:16} {what:22} "
                          f"{t * 1e3:8.2f} {base / t:10.3g}")  # fmt: skip
        chunk_rows(args, dtype)


def chunk_rows(args: argparse.Namespace, dtype: torch.dtype) -> None:
    """One prefill chunk of args.chunk new tokens of one sequence: the store, and the dense
    path's dequantize + attention, against vLLM's kernel over the model-dtype cache."""
    n = args.chunk
    _, keys, values = sequences(1, n, dtype)
    # Our path takes the query, key and value as vLLM passes them: strided views of one fused
    # qkv projection (a 3-d strided x @ M once cost 7x a 2-d product here).
    qkv = torch.randn(n, (HQ + 2 * HK) * D).to(dtype)
    query, k, v = (t.view(n, -1, D) for t in qkv.split([HQ * D, HK * D, HK * D], dim=-1))
    dense = paged_dense_cache(keys, values)
    repeat = max(3, args.repeat // 4)
    base = timed(repeat, paged_dense_attention, query.contiguous(), dense, [n], SCALE)
    what = f"prefill {n}"
    print(f"{str(dtype)[6:]:9} {'vLLM':12} {'model dtype':16} {what:22} {base * 1e3:8.2f} "
          f"{1.0:10.2f}")  # fmt: skip
    table = torch.arange(-(-n // BLOCK), dtype=torch.int32)[None]
    slots = torch.arange(n)
    for build in args.builds:
        use_build(build)
        for name, bits in CONFIGS.items():
            codec = make_codec(*bits)
            cache = torch.zeros(table.shape[1], HK, BLOCK, codec.layout.record_bytes,
                                dtype=torch.uint8)  # fmt: skip
            store = timed(repeat, store_kv, k, v, cache, slots, codec)
            attend = timed(
                repeat, dense_attention, query, cache, table, [0], [n], [n], codec, SCALE
            )
            for part, t in (("store", store), ("attention", attend), ("total", store + attend)):
                print(f"{str(dtype)[6:]:9} {build:12} {name:16} {what + ' ' + part:22} "
                      f"{t * 1e3:8.2f} {base / t:10.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
