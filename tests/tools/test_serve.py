"""`tq-vllm serve` on a machine whose memory is partly taken: it picks a KV budget that fits."""

import subprocess
import sys

import pytest

from tq_vllm.tools.serve import HEADROOM, cpu_memory_flags

vllm = pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from tq_vllm.plugin import compat  # noqa: E402
from tq_vllm.tools.model import MODEL_NAME  # noqa: E402
from tq_vllm.tools.server import Server, run_until_exit  # noqa: E402

# Touches every page of a bytearray of argv[1] bytes, says so, then holds it.
BALLOON = """
import sys, time
b = bytearray(int(sys.argv[1]))
b[::4096] = b"\\x01" * len(range(0, len(b), 4096))
print("held", flush=True)
time.sleep(3600)
"""


def test_the_users_budget_wins():
    env = {}
    assert cpu_memory_flags(["--gpu-memory-utilization", "0.5"], env) == []
    assert cpu_memory_flags(["--kv-cache-memory-bytes=1000000000"], env) == []
    assert cpu_memory_flags([], {"VLLM_CPU_KVCACHE_SPACE": "2"}) == []


@pytest.fixture
def memory_taken():
    """Another process holds memory until 60% of the NUMA node is available: vLLM's default
    (0.92 of the node) no longer fits."""
    _, total, available = compat.cpu_memory_node()
    size = available - int(0.6 * total)
    balloon = subprocess.Popen(
        [sys.executable, "-c", BALLOON, str(max(size, 0))], stdout=subprocess.PIPE, text=True
    )
    assert balloon.stdout.readline().strip() == "held"
    yield
    balloon.kill()
    balloon.wait()


@pytest.mark.server
def test_serve_fits_its_budget_to_available_memory(memory_taken, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    flags = ["--enforce-eager", "--max-model-len", "2048"]
    # The memory check is really provoked: vLLM's default fraction is refused.
    code, log = run_until_exit([*flags, "--gpu-memory-utilization", "0.92"], timeout=300)
    assert code not in (0, None) and "less than desired CPU memory utilization" in log
    _, total, available = compat.cpu_memory_node()  # what `tq-vllm serve` is about to see
    with Server(flags) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", timeout=300)
        r = client.completions.create(
            model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert "Paris" in r.choices[0].text
        chosen = int(server.log.split("tq-vllm: --kv-cache-memory-bytes ")[1].split()[0])
    # Half of what was available beyond HEADROOM (other processes' memory moves a little).
    assert 256 << 20 <= chosen < (available - HEADROOM) / 2 + (1 << 30)
