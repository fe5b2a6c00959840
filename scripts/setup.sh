#!/usr/bin/env bash
# Create .venv (or $KILN_VENV) with kiln installed from this checkout and its test extras.
# torch is pinned by constraints.txt to the CPU build; extra pip arguments are passed on.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KILN_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$root/constraints.txt" -e "$root[test]" "$@"
