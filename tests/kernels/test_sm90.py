"""Every served Triton kernel variant compiled for sm_90 (and a subset for sm_80) on this
machine, without a GPU (tq_vllm.tools.cuda_compile): it must compile, fit in the chip's shared
memory, and spill no registers beyond the caps stated below. `pytest -m sm90` runs these."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tq_vllm.quant.centroids import cache_dir

pytest.importorskip("triton")
pytestmark = pytest.mark.sm90

# The Triton versions compiled with: this venv's (CI's), and the one CUDA vLLM 0.33 runs with
# (it pins torch 2.14.0, which requires triton ~= 3.8.0), installed beside the tq_vllm cache.
TRITONS = {"venv": None, "vllm-0.33": "triton~=3.8.0"}

# Register spills (local memory, bytes per thread) measured with Triton 3.9 and 3.8 on
# 2026-12-01, the larger of the two, as caps: the store and the context kernel with fresh
# tokens hold [tokens, head_dim] float32 tiles of two matrix products at once and run out of
# registers from head_dim 128 on. Decode and the reduce kernel, the serving hot path, spill
# nothing. The exact window's context launch (no fresh tiles) measured 2026-12-03 the same way.
# Anything not listed: 0.
SPILL_CAPS = {
    (90, "d128 K4mse V4 float16 bs16", "store"): 248,
    (90, "d128 K4mse V4 float16 bs16", "context (fresh)"): 56,
    (90, "d128 K3prod V3 bfloat16 bs32", "store"): 144,
    (90, "d128 K3prod V3 bfloat16 bs32", "context (fresh)"): 56,
    (90, "d256 K2mse V8 bfloat16 bs16", "store"): 880,
    (90, "d256 K2mse V8 bfloat16 bs16", "context (cached)"): 248,
    (90, "d256 K2mse V8 bfloat16 bs16", "context (fresh)"): 408,
    (90, "d256 K2mse V8 bfloat16 bs16", "context (window)"): 152,
    (90, "d256 K8prod V1 float16 bs16", "store"): 3280,
    (90, "d256 K8prod V1 float16 bs16", "context (cached)"): 392,
    (90, "d256 K8prod V1 float16 bs16", "context (fresh)"): 488,
    (90, "d256 K8prod V1 float16 bs16", "context (window)"): 216,
    (90, "d128 K5mse V6 bfloat16 bs16", "store"): 88,
    (90, "d128 K5mse V6 bfloat16 bs16", "context (fresh)"): 64,
    (90, "d128 K7mse V7 float16 bs32", "store"): 32,
    (90, "d128 K7mse V7 float16 bs32", "context (fresh)"): 64,
    (90, "d64 K2+16x4mse V3 bfloat16 bs16", "context (fresh)"): 40,
    (90, "d128 K3+40x6mse V4 float16 bs32", "store"): 72,
    (90, "d128 K3+40x6mse V4 float16 bs32", "context (fresh)"): 80,
    (90, "d128 K3+40x6mse V4 float16 bs32", "context (window)"): 56,
    (90, "d128 K4mse V4 float16 bs16 sparse0.001 window512", "store"): 248,
    (90, "d128 K4mse V4 float16 bs16 sparse0.001 window512", "context (fresh)"): 72,
    (80, "d64 K6mse V5 bfloat16 bs16", "context (fresh)"): 64,
    (80, "d128 K4mse V4 float16 bs16", "store"): 24,
    (80, "d128 K4mse V4 float16 bs16", "context (fresh)"): 304,
    (80, "d128 K3prod V3 bfloat16 bs32", "store"): 88,
    (80, "d128 K3prod V3 bfloat16 bs32", "context (cached)"): 80,
    (80, "d128 K3prod V3 bfloat16 bs32", "context (fresh)"): 264,
    (80, "d128 K3prod V3 bfloat16 bs32", "context (window)"): 40,
}


def side_triton(requirement: str) -> Path:
    """A folder holding `requirement`'s Triton (pip --target, no dependencies), made once."""
    site = cache_dir() / requirement.replace("~=", "-") / "site"
    if not (site / "triton" / "__init__.py").is_file():
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
        subprocess.run([*pip, "--no-deps", "--target", site, requirement], check=True)
    return site


@pytest.fixture(scope="module", params=list(TRITONS))
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, said explicitly
    requirement = TRITONS[request.param]
    if requirement:
        env["PYTHONPATH"] = str(side_triton(requirement))
    proc = subprocess.run(
        [sys.executable, "-m", "tq_vllm.tools.cuda_compile", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.stdout.startswith("["), proc.stderr[-5000:]
    results = json.loads(proc.stdout)
    if requirement:
        assert all(r["triton"].startswith("3.8.") for r in results)
    return results


def test_at_least_20_sm90_variants_compile(compiled):
    sm90 = [r for r in compiled if r["arch"] == 90]
    assert len(sm90) >= 20
    kernels = {r["kernel"].split(":")[0] for r in sm90}
    assert kernels == {
        "store", "decode", "decode (registers)", "decode (lse)", "context (cached)",
        "context (fresh)", "context (window)",
    }  # fmt: skip
    for bits in range(1, 9):
        assert any(f"K{bits}" in r["variant"] for r in sm90), f"no {bits}-bit keys"
        assert any(f" V{bits} " in r["variant"] for r in sm90), f"no {bits}-bit values"
    assert sum("+" in r["variant"] for r in sm90) >= 8, "split keys (outlier channels)"
    assert sum("sparse" in r["variant"] for r in sm90) >= 4, "sparse V"
    assert all(r["sass_lines"] > 50 and r["registers"] > 0 for r in compiled)


def test_shared_memory_within_the_chip(compiled):
    over = [
        f"sm_{r['arch']} {r['variant']} {r['kernel']}: {r['shared_bytes']} > {r['shared_limit']}"
        for r in compiled
        if r["shared_bytes"] > r["shared_limit"]
    ]
    assert not over, over


def test_no_spills_beyond_the_stated_caps(compiled):
    over = []
    for r in compiled:
        cap = SPILL_CAPS.get((r["arch"], r["variant"], r["kernel"].split(":")[0]), 0)
        if r["spill_bytes"] > cap:
            over.append(f"sm_{r['arch']} {r['variant']} {r['kernel']}: {r['spill_bytes']} > {cap}")
    assert not over, over
    assert not any(r["spill_bytes"] for r in compiled if r["kernel"].startswith("decode"))


def test_sass_report_json():
    """benchmarks/sass_report.py --json: the decode kernel's static figures per variant and
    codebook."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).parents[2] / "benchmarks" / "sass_report.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout)
    keys = {"kernel", "head_dim", "key_bits", "value_bits", "gqa", "registers", "spills"}
    keys |= {"shared_bytes", "issue_per_token_head", "bytes_in_flight_per_sm", "codebook"}
    keys |= {"loads_per_token_head"}
    assert len(rows) == 36 and all(keys <= set(r) for r in rows)
    assert sorted(r["codebook"] for r in rows) == ["memory"] * 18 + ["registers"] * 18
    by = {(r["head_dim"], r["key_bits"], r["gqa"], r["codebook"]): r for r in rows}
    # Issue 18's offline bar for the new decode: d=128, GQA 4, K4 V4.
    new = by[128, 4, 4, "registers"]
    assert new["issue_per_token_head"] <= 100 and new["bytes_in_flight_per_sm"] >= 32_000
    for d, bits, gqa, codebook in by:  # at 4 bits: no centroid gathers, whole-word groups
        if codebook == "registers" and bits == 4:
            old = by[d, bits, gqa, "memory"]["loads_per_token_head"]
            assert by[d, bits, gqa, codebook]["loads_per_token_head"] < old / 2
    assert {(r["head_dim"], r["gqa"]) for r in rows} == {
        (d, g) for d in (64, 128) for g in (1, 4, 8)
    }
    for r in rows:
        assert r["kernel"] == "decode" and r["spills"] == 0
        assert 20 < r["issue_per_token_head"] < 1000 and r["bytes_in_flight_per_sm"] > 0
