"""Building and choosing the C++ CPU ops: one build per ISA, the best runnable one chosen at
load time (tests/conftest.py's cpu_isa runs the kernel tests on every runnable build)."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tq_vllm.kernels import cpu_extension


def test_variants_best_first_and_portable_always_runs():
    runnable = cpu_extension.runnable_variants()
    names = [name for name, _, _ in cpu_extension.VARIANTS]
    assert runnable[-1] == "portable"
    assert runnable == sorted(runnable, key=names.index)
    flags = cpu_extension.cpu_flags()
    if {"avx2", "fma"} <= flags:
        assert "avx2" in runnable
    if "avx512vbmi" not in flags:
        assert not [name for name in runnable if name.startswith("avx512")]


def test_forced_variant(monkeypatch):
    monkeypatch.setenv(cpu_extension.ISA_ENV, "portable")
    assert cpu_extension.chosen_variant() == "portable"
    monkeypatch.setenv(cpu_extension.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="TQ_VLLM_CPU_ISA='sse9': unknown"):
        cpu_extension.chosen_variant()
    monkeypatch.setattr(cpu_extension, "runnable_variants", lambda: ["portable"])
    monkeypatch.setenv(cpu_extension.ISA_ENV, "avx2")
    with pytest.raises(ValueError, match="not executable on this CPU"):
        cpu_extension.chosen_variant()


def test_build_directory_keyed_by_content_not_machine(monkeypatch):
    """The cache can be shared between hosts: the CPU's flags do not enter the key, the
    variant and the sources do."""
    before = {v: cpu_extension.build_directory(v) for v in ("avx2", "portable")}
    assert before["avx2"] != before["portable"]
    monkeypatch.setattr(cpu_extension, "cpu_flags", lambda: {"avx2"})
    assert cpu_extension.build_directory("avx2") == before["avx2"]
    monkeypatch.setattr(cpu_extension, "HEADERS", cpu_extension.HEADERS[:1])
    assert cpu_extension.build_directory("avx2") != before["avx2"]


def test_startup_log_names_the_build(caplog):
    with caplog.at_level(logging.INFO, logger="tq_vllm"):
        assert cpu_extension.available.__wrapped__() is True
    assert f"the {cpu_extension.chosen_variant()} build" in caplog.text


def test_build_failure_warns(tmp_path, monkeypatch, caplog):
    """A source the compiler rejects: one warning naming the cause, and no kernel."""
    broken = tmp_path / "store.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_extension, "SOURCES", [broken, *cpu_extension.SOURCES[1:]])
    monkeypatch.setenv("TQ_VLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_extension, "load", cpu_extension.load.__wrapped__)  # no cached load
    with caplog.at_level(logging.WARNING, logger="tq_vllm"):
        assert cpu_extension.available.__wrapped__() is False
    assert "could not be built" in caplog.text and "PyTorch reference" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_ops_run_on_torchs_openmp_threads():
    """at::parallel_for runs in parallel only where the extension is built with OpenMP, and on
    the threads vLLM binds only where it uses torch's runtime: the build calls libgomp, and
    loading it into a process that runs torch maps no second OpenMP library."""
    script = (
        "import torch\n"
        "from tq_vllm.kernels import cpu_extension\n"
        "def runtimes():\n"
        "    return sorted({l.split()[-1] for l in open('/proc/self/maps') if 'gomp' in l})\n"
        "before = runtimes()\n"
        "assert cpu_extension.available()\n"
        "print(before == runtimes(), before, runtimes())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("True"), proc.stdout
    variant = cpu_extension.chosen_variant()
    built = cpu_extension.build_directory(variant) / f"tq_vllm_cpu_ops_{variant}.so"
    assert b"GOMP_parallel" in built.read_bytes()
