"""Kernels over the compressed paged cache, installed as tq_vllm.kernels.

One folder per op, each with its PyTorch reference (the contract), its Triton kernel (CUDA)
and its C++ part (CPU):

    store/    quantize new tokens into their records:  reference.py, triton_store.py,
              cpu_store.py + store.cpp
    decode/   one query per sequence:                  reference.py, triton_decode.py,
              cpu_decode.py + attention.cpp (the fused C++ attention, short chunks too)
    context/  prefill chunks over context + new ones:  reference.py, triton_context.py,
              cpu_context.py, dense.py + dequantize.cpp (then vLLM's CPU attention kernel)

Shared: common.py (argument checks, per-codec state), triton_tiles.py (Triton tile helpers),
triton_unpack.py and register_codebook.py (Triton index unpacking and centroid lookups),
cpu_extension.py and csrc/ (the C++ build and headers), dispatch.py (which one runs where).
Importing this package imports nothing: the CPU path needs no Triton, the benchmarks no vLLM.
"""
