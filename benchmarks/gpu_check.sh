#!/usr/bin/env bash
# The GPU check, in one command, on a machine with torch + triton + a CUDA GPU (no vLLM needed):
# the kernel tests compiled for real, then the kernel benchmark at three shapes.
#   bash benchmarks/gpu_check.sh [OUTDIR]
set -uo pipefail
out=${1:-.}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi -L
timeout 240 python3 -m pytest -q -p no:cacheprovider \
    tests/test_kernels_store.py tests/test_kernels_decode.py tests/test_kernels_context.py \
    2>&1 | tee "$out/kernel_tests.log"
for shape in "--key-bits 3 --value-bits 3" "--key-bits 6 --value-bits 4" \
    "--head-dim 64 --kv-heads 3 --gqa 3 --key-bits 6 --value-bits 4"; do
    # shellcheck disable=SC2086
    timeout 150 python3 benchmarks/bench_kernels.py $shape 2>&1 | tee -a "$out/bench_kernels.md"
    echo | tee -a "$out/bench_kernels.md"
done
