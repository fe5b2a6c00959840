"""`kiln bench --concurrency N`: the engine under N simultaneous requests.

One fresh process per run (`python -m kiln.bench.concurrency`): N requests with prompts of
the same length and max_length drawn from 16-256 new tokens (fixed seed), run once one after
another (each alone, as a one-request-at-a-time server would) and once submitted together.
Reported for each: aggregate tokens/s, time to first token and inter-token latency (p50,
p99) from every token's arrival time. Greedy decoding, no early stop.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

MIN_NEW, MAX_NEW = 16, 256


def workload(count: int, prompt_tokens: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) per request; the same seed gives the same requests."""
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(prompt_tokens)], rng.randint(MIN_NEW, MAX_NEW))
            for _ in range(count)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def latency_figures(starts: dict[int, float], arrivals: dict[int, list[float]], wall: float) -> dict:
    ttft = [arrivals[i][0] - starts[i] for i in arrivals]
    itl = [later - earlier for times in arrivals.values()
           for earlier, later in zip(times, times[1:], strict=False)]
    tokens = sum(len(times) for times in arrivals.values())
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99)}


def _submit(engine, prompt: list[int], new_tokens: int) -> int:
    return engine.add_request(prompt, max_length=new_tokens, min_length=new_tokens,
                              include_prompt_in_result=False)


def run_together(engine, requests) -> dict:
    """Every request submitted at once; the engine stepped until all are done."""
    starts, arrivals = {}, {}
    begin = time.perf_counter()
    ids = []
    for prompt, new_tokens in requests:
        request_id = _submit(engine, prompt, new_tokens)
        starts[request_id], arrivals[request_id] = time.perf_counter(), []
        ids.append(request_id)
    while engine.has_work():
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            if event.token_id is not None:
                arrivals[event.request_id].append(now)
    wall = time.perf_counter() - begin
    for request_id in ids:
        engine.release(request_id)
    return latency_figures(starts, arrivals, wall)


def run_one_by_one(engine, requests) -> dict:
    starts, arrivals = {}, {}
    begin = time.perf_counter()
    for prompt, new_tokens in requests:
        request_id = _submit(engine, prompt, new_tokens)
        starts[request_id], arrivals[request_id] = time.perf_counter(), []
        for event in engine.stream(request_id):
            if event.token_id is not None:
                arrivals[request_id].append(time.perf_counter())
    return latency_figures(starts, arrivals, time.perf_counter() - begin)


def measure(model: str, compute_type: str, concurrency: int, prompt_tokens: int, vocab: int,
            seed: int, threads: int, device: str) -> dict:
    import torch

    from kiln.generation.engine import Engine

    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = Engine(model, device=device, compute_type=compute_type,
                    max_batch_size=max(concurrency, 1))
    load_s = time.perf_counter() - start
    requests = workload(concurrency, prompt_tokens, vocab, seed)
    start = time.perf_counter()
    engine.warm_up(prompt_tokens + MAX_NEW)  # every decode step captured before timing
    warm_up_s = time.perf_counter() - start
    warm = [(prompt, 8) for prompt, _ in requests]
    run_together(engine, warm)
    run_one_by_one(engine, warm[:1])
    one_by_one = run_one_by_one(engine, requests)
    together = run_together(engine, requests)
    return {"load_s": load_s, "warm_up_s": warm_up_s, "compute_type_used": engine.loaded.compute.name,
            "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
            "sequential": one_by_one, "concurrent": together,
            "aggregate_speedup": together["tokens_per_s"] / one_by_one["tokens_per_s"],
            "itl_p99_over_single_stream": together["itl_p99_s"] / one_by_one["itl_p50_s"]}


def summarize(runs: list[dict]) -> dict:
    """The median of each figure over the runs."""
    def median(path):
        values = []
        for run in runs:
            value = run
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    figures = {}
    for mode in ("sequential", "concurrent"):
        figures[mode] = {key: median((mode, key)) for key in runs[0][mode]}
    figures["aggregate_speedup"] = median(("aggregate_speedup",))
    figures["itl_p99_over_single_stream"] = median(("itl_p99_over_single_stream",))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.concurrency", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--compute-type", default="default")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    record = measure(args.model, args.compute_type, args.concurrency, args.prompt_tokens,
                     args.vocab, args.seed, args.threads, args.device)
    print(json.dumps({**vars(args), **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---------------------------------------------------------------- the harness side


def worker_command(folder: str, compute_type: str, concurrency: int, prompt_tokens: int,
                   vocab: int, seed: int, threads: int, device: str) -> list[str]:
    return [sys.executable, "-m", "kiln.bench.concurrency", "--model", folder,
            "--compute-type", compute_type, "--concurrency", str(concurrency),
            "--prompt-tokens", str(prompt_tokens), "--vocab", str(vocab), "--seed", str(seed),
            "--threads", str(threads), "--device", device]


def markdown(cells: list[dict]) -> str:
    """One row per (model, engine, concurrency): sequential vs together, medians of the runs."""
    lines = ["| model | engine | requests | one by one tok/s | together tok/s | aggregate | "
             "TTFT p50 / p99 one by one | TTFT p50 / p99 together | ITL p50 / p99 one by one | "
             "ITL p50 / p99 together | ITL p99 / single-stream ITL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        if cell.get("error"):
            lines.append(f"| {cell['model']} | {cell['engine']} | {cell['concurrency']} | "
                         f"error: {cell['error'][:120]} |" + " |" * 7)
            continue
        one, together = cell["sequential"], cell["concurrent"]
        ms = lambda seconds: f"{seconds * 1000:.0f}"  # noqa: E731
        lines.append(
            f"| {cell['model']} | {cell['engine']} | {cell['concurrency']} | "
            f"{one['tokens_per_s']:.1f} | {together['tokens_per_s']:.1f} | "
            f"**{cell['aggregate_speedup']:.2f}x** | "
            f"{ms(one['ttft_p50_s'])} / {ms(one['ttft_p99_s'])} ms | "
            f"{ms(together['ttft_p50_s'])} / {ms(together['ttft_p99_s'])} ms | "
            f"{ms(one['itl_p50_s'])} / {ms(one['itl_p99_s'])} ms | "
            f"{ms(together['itl_p50_s'])} / {ms(together['itl_p99_s'])} ms | "
            f"{cell['itl_p99_over_single_stream']:.2f}x |")
    return "\n".join(lines) + "\n"


def run_cases(models, engines, folders: list[dict], options) -> list[dict]:
    """Every (model, engine, N) in `options.runs` fresh processes, engines alternated; the
    median of each figure."""
    import subprocess

    from .folders import tokenizer_size
    from .run import _log, _worker_env

    prepared = {(f["model"], f["engine"]): f for f in folders}
    cells = []
    for model in models:
        vocab = tokenizer_size(options.work_dir / model.name / "hf")
        for count in options.concurrency:
            records: dict[str, list[dict]] = {str(engine): [] for engine in engines}
            errors: dict[str, str] = {}
            for run in range(options.runs):
                for engine in engines:
                    label, folder = str(engine), prepared[(model.name, str(engine))]
                    if label in errors:
                        continue
                    if folder.get("error"):
                        errors[label] = folder["error"]
                        continue
                    env = _worker_env(options.threads)
                    if engine.backend:
                        env["KILN_INT8_BACKEND"] = engine.backend
                    command = worker_command(folder["path"], "default", count,
                                             options.prompt_tokens[0], vocab, options.seed,
                                             options.threads, options.device)
                    done = subprocess.run(command, capture_output=True, text=True, env=env,
                                          timeout=options.worker_timeout_s)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    if done.returncode != 0 or not lines:
                        errors[label] = " / ".join(done.stderr.strip().splitlines()[-3:])
                        _log(f"{model.name} {label} x{count} run {run + 1}: error: {errors[label]}")
                        continue
                    record = json.loads(lines[-1])
                    records[label].append(record)
                    _log(f"{model.name} {label} x{count} run {run + 1}: "
                         f"{record['aggregate_speedup']:.2f}x aggregate, ITL p99 "
                         f"{record['itl_p99_over_single_stream']:.2f}x single-stream")
            for label, runs in records.items():
                cell = {"model": model.name, "engine": label, "concurrency": count, "runs": runs}
                if label in errors:
                    cell["error"] = errors[label]
                elif runs:
                    cell.update(summarize(runs))
                cells.append(cell)
    return cells


def write_outputs(results: dict, output, benchmarks_md) -> dict:
    from pathlib import Path

    from .publish import RESULTS_FILE, TABLE_FILE, _section_id, update_benchmarks_md

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"results": output / RESULTS_FILE, "table": output / TABLE_FILE}
    paths["results"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    machine = results["machine"]
    title = (f"Engine under concurrent requests: {machine['cpu']}, "
             f"{results['options']['threads']} threads, {machine['date'][:10]}")
    body = (f"Command: `{results['command']}`. Prompts of {results['options']['prompt_tokens'][0]} "
            f"tokens; each request generates {MIN_NEW}-{MAX_NEW} tokens (seeded), greedy, no early "
            "stop. *One by one*: each request alone, start to end, as a server serving one "
            "caller at a time would. *Together*: all submitted at once to one engine. "
            "Aggregate = together tok/s / one-by-one tok/s; single-stream ITL = the one-by-one "
            f"ITL p50. Medians of {results['options']['runs']} fresh processes.\n\n"
            + markdown(results["cells"]))
    paths["table"].write_text(body, encoding="utf-8")
    if benchmarks_md is not None:
        update_benchmarks_md(Path(benchmarks_md), _section_id(output, Path(benchmarks_md)), title,
                             body)
        paths["benchmarks_md"] = Path(benchmarks_md)
    return paths
