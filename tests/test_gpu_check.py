"""The GPU check script must be ready to run in one call: its whole flow, smoke-run on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    output = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "tiny", "--batches", "1", "2",
         "--new-tokens", "4", "--output", str(output), "--speculative", "tiny", "tiny"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(output.read_text())
    assert {row["compute_type"] for row in report["correctness"]} == {
        "float32", "bfloat16", "int8_float16", "int8_bfloat16", "int8_float16@int_mm",
        "int4_bfloat16", "int4_float16"}
    float32 = [row for row in report["correctness"] if row["compute_type"] == "float32"]
    assert all(row["max_abs_diff"] <= 1e-3 and row["greedy_agreement"] == 1.0 for row in float32)
    assert all(row["graph_vs_eager"] < (1e-5 if row["compute_type"] == "float32" else 2e-2)
               for row in report["correctness"])
    int4 = [row for row in report["correctness"] if row["compute_type"].startswith("int4")]
    assert all(row["ok"] and row["int4_kernel"] == 1.0 for row in int4), int4
    engines = {row["engine"] for row in report["speed"]}
    assert engines == {"kiln:int8_float16", "kiln:int4_bfloat16", "kiln:bfloat16",
                       "kiln:int8_float16 eager",
                       "kiln:int8_float16 int_mm", "transformers:float16"}
    assert all(set(row["prefill_tokens_per_s"]) == {"1", "2"} for row in report["speed"])
    assert all(set(row["rates"]) == {"1", "2"} for row in report["speed"])
    assert "decode tokens/s" in result.stdout
    speculative = report["speculative"]
    assert speculative["greedy_equal"] and speculative["c"] > 0 and speculative["v"] > 0
    assert "speculative decoding, tiny drafting for tiny" in result.stdout
