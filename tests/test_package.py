"""The package as a whole: its tree (no import cycles, small modules), the CPU path without
Triton, and both ways of installing it (editable, as tq.sh does, and from a wheel)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tq_vllm
import tq_vllm.configs
import tq_vllm.kernels

REPO = Path(__file__).resolve().parents[1]
# Where each top package's source lives (kernels/ and configs/ sit at the top of the repository
# and are installed inside tq_vllm).
ROOTS = {
    "tq_vllm": Path(tq_vllm.__path__[0]),
    "tq_vllm.kernels": Path(tq_vllm.kernels.__path__[0]),
    "tq_vllm.configs": Path(tq_vllm.configs.__path__[0]),
}
MAX_LINES = 400


def source_files(suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Dotted name -> file, for every source of the package with one of these suffixes."""
    files = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*")):
            if path.suffix in suffixes and "__pycache__" not in path.parts:
                parts = path.relative_to(root).with_suffix("").parts
                files[".".join((package, *parts)).removesuffix(".__init__")] = path
    return files


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules a file imports, function bodies included: `from X import a` names
    X.a where that is a module, else X."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def test_no_import_cycles():
    files = source_files((".py",))
    modules = set(files)
    graph = {m: imports_of(p, modules) - {m} for m, p in files.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m)
    assert len(modules) > 40  # the walk found the package


def test_modules_stay_small():
    files = source_files((".py", ".cpp", ".h"))
    assert any(name.endswith("attention") for name in files)  # C++ sources are counted
    long = {n: len(p.read_text().splitlines()) for n, p in files.items()}
    long = {n: lines for n, lines in long.items() if lines > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# Store two tokens and decode one query through the dispatch the CPU server uses, then report
# where the package was imported from and whether a top-level `kernels` module is visible.
SMOKE = """
import importlib.util, sys, torch
import tq_vllm, tq_vllm.kernels
from tq_vllm.kernels import cpu_extension, dispatch
from tq_vllm.plugin.config import load_config
from tq_vllm.record.codec import LayerCodec
layout = load_config().layouts(64, 2)[0]
codec = LayerCodec(layout, seed=0)
cache = torch.zeros(2, 1, 16, layout.record_bytes, dtype=torch.uint8)
kv = torch.randn(2, 1, 64)
dispatch.store_kv(kv, kv, cache, torch.tensor([16, 17]), codec)
out = dispatch.decode_attention(torch.randn(1, 2, 64), cache, torch.tensor([[1]]),
                                torch.tensor([2]), codec, 0.125)
assert torch.isfinite(out).all()
print(tq_vllm.__file__, tq_vllm.kernels.__file__, cpu_extension.available(),
      sys.modules.get('triton') is not None, importlib.util.find_spec('kernels') is not None)
"""


def test_cpu_path_runs_without_triton(tmp_path):
    """Triton blocked from importing: the CPU path still stores and attends (C++ ops)."""
    out = run_python("import sys; sys.modules['triton'] = None\n" + SMOKE, tmp_path)
    package, kernels, built, triton_loaded, top_level_kernels = out.split()
    assert built == "True" and triton_loaded == "False" and top_level_kernels == "False"


def test_editable_install_maps_kernels_and_configs(tmp_path):
    """tq.sh installs the repository in editable mode: from any folder, tq_vllm comes from the
    repository and tq_vllm.kernels from its top-level kernels/."""
    out = run_python(SMOKE, tmp_path)
    package, kernels, built, _, top_level_kernels = out.split()
    assert Path(package) == REPO / "tq_vllm" / "__init__.py"
    assert Path(kernels) == REPO / "kernels" / "__init__.py"
    assert built == "True" and top_level_kernels == "False"


@pytest.mark.server  # builds a wheel and compiles the C++ ops from the installed copy
def test_wheel_installs_kernels_and_configs_inside_the_package(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)]
    subprocess.run(build, check=True, timeout=600, capture_output=True)
    (wheel,) = tmp_path.glob("tq_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"tq_vllm"}
    expected = [f"tq_vllm/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")]
    expected += [
        f"tq_vllm/kernels/{p.relative_to(REPO / 'kernels')}"
        for p in (REPO / "kernels").rglob("*")
        if p.suffix in (".py", ".cpp", ".h") and "__pycache__" not in p.parts
    ]
    assert len(expected) > 20 and not set(expected) - set(names), set(expected) - set(names)
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = {"PYTHONPATH": str(site), "TQ_VLLM_CACHE_DIR": str(tmp_path / "cache")}
    out = run_python(SMOKE, tmp_path, env)
    package, kernels, built, _, top_level_kernels = out.split()
    assert Path(package) == site / "tq_vllm" / "__init__.py"
    assert Path(kernels) == site / "tq_vllm" / "kernels" / "__init__.py"
    assert built == "True" and top_level_kernels == "False"
