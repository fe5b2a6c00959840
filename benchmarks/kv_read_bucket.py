"""The CPU decode step's KV read bucket, A/B in one process: Pythia-410m int8 (kiln bench's
folder; build it with `kiln bench --models 410m --engines kiln:int8 --prepare-only`), 8 rows
at 128 positions, the traced step, 256-column and 32-column buckets alternated for 6 rounds
of 8 steps; prints the median step time of each.

    python benchmarks/kv_read_bucket.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import kiln.generation.static_step as static_step
from kiln.generation.loaded_model import open_model
from kiln.generation.runner import ModelRunner
from kiln.model.kv_cache import KVCache


def main() -> None:
    torch.set_num_threads(2)
    folder = next((Path.home() / ".cache/kiln/bench/410m").glob("kiln-int8*"))
    loaded = open_model(folder, compute_type="int8")
    cache = KVCache(loaded.spec, 8, 512, loaded.dtype, loaded.device)
    runner = ModelRunner(loaded.model, cache, loaded.device)
    generator = torch.Generator().manual_seed(0)
    runner.prefill([(slot, torch.randint(0, 50000, (128,), generator=generator).tolist(), 0,
                     False) for slot in range(8)])
    runner.warm_up(256)
    rows = [(slot, 5, 128) for slot in range(8)]
    medians: dict[int, list[float]] = {256: [], 32: []}
    with torch.inference_mode():
        for _ in range(6):
            for bucket in medians:
                static_step.CPU_KV_BUCKET = bucket
                runner.decode(rows)
                times = []
                for _ in range(8):
                    start = time.perf_counter()
                    runner.decode(rows)
                    times.append(time.perf_counter() - start)
                medians[bucket].append(statistics.median(times) * 1000)
    for bucket, values in medians.items():
        print(f"bucket {bucket}: batch-8 step {statistics.median(values):.1f} ms "
              f"(rounds: {', '.join(f'{v:.1f}' for v in values)})")


if __name__ == "__main__":
    main()
