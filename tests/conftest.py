import os

# Triton kernels run on CPU tensors in the interpreter; it must be set before triton loads.
# On a machine with a GPU, set TRITON_INTERPRET=0 to compile them for real.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault(
    "TQ_VLLM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tq_vllm")
)
