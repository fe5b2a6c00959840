"""The KV cache's dtype on CPU: SmolLM2-135M perplexity (GPL-3, first 2048 tokens) and decode
speed (512-token prompt, 128 new tokens, batch 1 and 8) with a float32 and a bfloat16 cache,
for float32 and int8 weights. Each configuration in a fresh process, alternated, medians.

    python benchmarks/kv_cache_dtype.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "GPL-3"
CONFIGS = [("float32", "float32"), ("float32", "bfloat16"), ("int8", "float32"),
           ("int8", "bfloat16")]


def measure(compute_type: str, kv_cache_dtype: str) -> dict:
    import torch

    import kiln
    from kiln.perplexity import perplexity

    torch.set_num_threads(2)
    generator = kiln.Generator(compute_type=compute_type, kv_cache_dtype=kv_cache_dtype)
    text = TEXT.read_text(encoding="utf-8")
    record = {"perplexity": perplexity(generator, text, max_tokens=2048).perplexity}
    prompt = generator.tokenizer.encode(text)[:512]
    for batch in (1, 8):
        def run(tokens: int, batch: int = batch) -> float:
            start = time.perf_counter()
            generator.generate_batch([prompt] * batch, max_length=tokens, min_length=tokens,
                                     include_prompt_in_result=False)
            return time.perf_counter() - start
        run(1), run(16)
        first, total = run(1), run(129)
        record[f"decode_b{batch}"] = batch * 128 / (total - first)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("COMPUTE", "KV"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return 0
    results: dict[tuple[str, str], list[dict]] = {config: [] for config in CONFIGS}
    for _ in range(args.runs):
        for config in CONFIGS:
            done = subprocess.run([sys.executable, __file__, "--worker", *config],
                                  capture_output=True, text=True, check=True)
            results[config].append(json.loads(done.stdout.splitlines()[-1]))
    print("| weights | KV cache | perplexity | decode tok/s, batch 1 | decode tok/s, batch 8 |")
    print("|---|---|---|---|---|")
    for (compute, kv), runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"| {compute} | {kv} | {median['perplexity']:.4f} | {median['decode_b1']:.1f} | "
              f"{median['decode_b8']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
