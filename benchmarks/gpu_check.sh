#!/usr/bin/env bash
# kiln's GPU check, in one call on a bare GPU machine (torch + transformers preinstalled, no
# network): correctness against transformers on the card, then Pythia-shape decode speed.
# Results: the printed table and $OUT/gpu_check.json (or benchmarks/results/). About 8 minutes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$root/benchmarks/results}"
mkdir -p "$out"
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" python benchmarks/gpu_check.py \
    --output "$out/gpu_check.json" "$@"
