"""The plugin against vLLM 0.33.0, the CUDA wheel GPU users install, on this machine without a
GPU: the wheel goes (without its dependencies: the CPU torch of this environment serves) into
the tq_vllm cache once, and scripts/vllm033_smoke.py runs against it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tq_vllm.quant.centroids import cache_dir

pytestmark = pytest.mark.server
VERSION = "0.33.0"


@pytest.fixture(scope="module")
def vllm033() -> Path:
    site = cache_dir() / f"vllm-{VERSION}" / "site"
    if not (site / "vllm" / "__init__.py").is_file():
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        wheels = site.parent / "wheels"
        subprocess.run(
            [*pip, "download", "--no-deps", f"vllm=={VERSION}", "-d", wheels], check=True
        )
        (wheel,) = wheels.glob("vllm-*.whl")
        subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    return site


def test_plugin_registers_and_routes_in_vllm_033(vllm033, tmp_path):
    script = Path(__file__).parents[1] / "scripts" / "vllm033_smoke.py"
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(vllm033)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checks = [line for line in proc.stdout.splitlines() if line.startswith("OK ")]
    assert len(checks) == 10, proc.stdout
