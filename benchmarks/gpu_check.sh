#!/usr/bin/env bash
# The GPU check, in one command, on a machine with torch + triton + a CUDA GPU (no vLLM needed):
# the kernel tests compiled for real (the register codebook's prmt and a CUDA graph replay of
# the decode included), then the kernel benchmark at three shapes, each decode timed with both
# codebooks.
#   bash benchmarks/gpu_check.sh [OUTDIR]     (under 10 minutes: the device tool's limit per call)
# Nothing is installed: the package is staged as an install lays it out (kernels/ and configs/
# inside tq_vllm/) in a temporary folder that the tests and the benchmark import from.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-.}" && cd "${1:-.}" && pwd)
stage=$(mktemp -d)
cp -r "$repo/tq_vllm" "$stage/tq_vllm"
cp -r "$repo/kernels" "$stage/tq_vllm/kernels"
cp -r "$repo/configs" "$stage/tq_vllm/configs"
cd "$stage"  # first on sys.path: the staged tq_vllm, not the repository's
export PYTHONPATH=$stage${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=${TRITON_INTERPRET:-0}
[ "$TRITON_INTERPRET" = 1 ] || nvidia-smi -L
timeout 180 python3 -m pytest -q -p no:cacheprovider --rootdir "$repo" \
    "$repo/tests/kernels/test_triton_store.py" "$repo/tests/kernels/test_triton_decode.py" \
    "$repo/tests/kernels/test_triton_context.py" "$repo/tests/kernels/test_register_codebook.py" \
    "$repo/tests/kernels/test_cuda_graph_decode.py" \
    2>&1 | tee "$out/kernel_tests.log"
for shape in "--key-bits 4 --value-bits 4" "--key-bits 3 --value-bits 3" \
    "--key-bits 6 --value-bits 4"; do
    # shellcheck disable=SC2086
    timeout 130 python3 "$repo/benchmarks/bench_kernels.py" $shape 2>&1 | tee -a "$out/bench_kernels.md"
    echo | tee -a "$out/bench_kernels.md"
done
