"""The engine-core targets of any kiln tree, measured by THIS tree's worker and client code,
so that two trees (this checkout and a worktree of an older commit) compare like for like:

    git worktree add /tmp/kiln-before decd5e9
    python benchmarks/engine_targets.py --tree /tmp/kiln-before --models tiny smollm2 410m
    python benchmarks/engine_targets.py --models tiny smollm2 410m      # this checkout

For each model (the `kiln bench` folders, built once) and each run, in fresh processes with
TREE first on PYTHONPATH: the worker `kiln/bench/concurrency.py` of this tree (N threads
against one call, first burst, batch-N decode speed, host share of a step; an older engine
without `engine.timing` is timed through its runner and `step`), then `kiln serve` of TREE
under N concurrent streams (`kiln/bench/serving.py`). Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from kiln.bench.concurrency import FIXED_NEW, fixed_prompts
    from kiln.bench.concurrency_run import summarize, with_server
    from kiln.bench.folders import DEFAULT_WORK_DIR, EngineType, engine_folder, resolve_models, tokenizer_size
    from kiln.bench.serving import measure_server

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the kiln tree to measure")
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2", "410m"])
    parser.add_argument("--engine", default="kiln:int8")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = parser.parse_args()
    tree, work_dir = args.tree.resolve(), args.work_dir.expanduser()
    engine = EngineType.parse(args.engine)
    env_path = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads),
                    TOKENIZERS_PARALLELISM="false")
    for model in resolve_models(args.models):
        model_engine = EngineType("kiln", "float32") if model.name == "tiny" else engine
        folder = engine_folder(model, model_engine, work_dir)
        vocab = tokenizer_size(work_dir / model.name / "hf")
        runs = []
        for _ in range(args.runs):
            done = subprocess.run(
                [sys.executable, str(ROOT / "kiln" / "bench" / "concurrency.py"), "--model",
                 str(folder), "--concurrency", str(args.concurrency), "--prompt-tokens",
                 str(args.prompt_tokens), "--vocab", str(vocab), "--threads", str(args.threads)],
                capture_output=True, text=True, env=env_path, cwd=tempfile.gettempdir(),
                check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if not lines:
                raise SystemExit(f"worker failed: {done.stderr[-2000:]}")
            runs.append(json.loads(lines[-1]))
        cell = summarize(runs)
        prompts = fixed_prompts(args.concurrency, args.prompt_tokens, vocab, 0)
        serve = measure_server(str(folder), prompts, FIXED_NEW, args.threads, args.runs,
                               Path(tempfile.gettempdir()) / f"serve-{model.name}.log",
                               {"PYTHONPATH": str(tree)})
        with_server(cell, serve)
        keep = ("one_call_tokens_per_s", "threads_tokens_per_s", "first_burst_tokens_per_s",
                "in_turn_tokens_per_s", "threads_over_one_call", "first_burst_over_one_call",
                "decode_tokens_per_s", "serve_over_decode", "serve_ttft_ratio", "host_fraction",
                "host_ms_per_step", "step_ms", "load_s")
        figures = {key: round(cell[key], 4) for key in keep if key in cell}
        figures["serve_tokens_per_s"] = round(serve["sustained_tokens_per_s"], 2)
        figures["serve_whole_run_tokens_per_s"] = round(serve["together_tokens_per_s"], 2)
        figures["serve_ttft_p50_ms"] = [round(1000 * serve["alone_ttft_p50_s"], 1),
                                        round(1000 * serve["together_ttft_p50_s"], 1)]
        figures["load_s"] = round(statistics.median(r["load_s"] for r in runs), 2)
        print(json.dumps({"tree": str(tree), "model": model.name,
                          "engine": str(model_engine), **figures}), flush=True)


if __name__ == "__main__":
    main()
