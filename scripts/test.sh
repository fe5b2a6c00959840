#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KILN_VENV:-$root/.venv}"
"$root/scripts/setup.sh"
cd "$root"
exec "$venv/bin/python" -m pytest -q "$@"
