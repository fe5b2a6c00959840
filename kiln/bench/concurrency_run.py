"""The harness side of `kiln bench --concurrency N` (the worker is concurrency.py): runs the
workers and `kiln serve` for every (model, engine, N), and writes the tables."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from .concurrency import FIXED_NEW, MAX_NEW, MIN_NEW, fixed_prompts
from .processes import log, worker_env
from .serving import WAVES

RAGGED = ("sequential", "concurrent")


def worker_command(folder: str, compute_type: str, concurrency: int, prompt_tokens: int,
                   vocab: int, seed: int, threads: int, device: str) -> list[str]:
    return [sys.executable, "-m", "kiln.bench.concurrency", "--model", folder,
            "--compute-type", compute_type, "--concurrency", str(concurrency),
            "--prompt-tokens", str(prompt_tokens), "--vocab", str(vocab), "--seed", str(seed),
            "--threads", str(threads), "--device", device]


def summarize(runs: list[dict]) -> dict:
    """The median of each figure over the runs."""
    figures = {mode: {key: statistics.median(run[mode][key] for run in runs)
                      for key in runs[0][mode]} for mode in RAGGED}
    for key, value in runs[0].items():
        if isinstance(value, float) and key not in ("load_s",):
            figures[key] = statistics.median(run[key] for run in runs)
    return figures


def with_server(cell: dict, serve: dict) -> dict:
    """The server's figures and the two server targets' ratios."""
    cell["serve"] = serve
    cell["serve_over_decode"] = serve["sustained_tokens_per_s"] / cell["decode_tokens_per_s"]
    cell["serve_ttft_ratio"] = serve["together_ttft_p50_s"] / serve["alone_ttft_p50_s"]
    return cell


def targets_table(cells: list[dict]) -> str:
    lines = ["| model | engine | N | one call of N tok/s | N threads tok/s | threads / one call | "
             "first burst / one call | in turn tok/s | batch-N decode tok/s | serve c=N tok/s (whole run) | "
             "serve / decode | serve TTFT p50 c=1 / c=N | TTFT c=N / c=1 | host / step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        if cell.get("error"):
            lines.append(f"| {cell['model']} | {cell['engine']} | {cell['concurrency']} | "
                         f"error: {cell['error'][:120]} |" + " |" * 10)
            continue
        serve = cell.get("serve") or {}
        ms = lambda seconds: f"{seconds * 1000:.0f}"  # noqa: E731
        serving = (f"{serve['sustained_tokens_per_s']:.1f} ({serve['together_tokens_per_s']:.1f}) | "
                   f"**{cell['serve_over_decode']:.2f}x** | "
                   f"{ms(serve['alone_ttft_p50_s'])} / {ms(serve['together_ttft_p50_s'])} ms | "
                   f"**{cell['serve_ttft_ratio']:.2f}x**") if serve else "- | - | - | -"
        lines.append(
            f"| {cell['model']} | {cell['engine']} | {cell['concurrency']} | "
            f"{cell['one_call_tokens_per_s']:.1f} | {cell['threads_tokens_per_s']:.1f} | "
            f"**{cell['threads_over_one_call']:.2f}x** | **{cell['first_burst_over_one_call']:.2f}x** | "
            f"{cell['in_turn_tokens_per_s']:.1f} | {cell['decode_tokens_per_s']:.1f} | {serving} | "
            f"{cell['host_ms_per_step']:.2f} of {cell['step_ms']:.1f} ms "
            f"(**{100 * cell['host_fraction']:.1f}%**) |")
    return "\n".join(lines) + "\n"


def ragged_table(cells: list[dict]) -> str:
    """One row per (model, engine, concurrency): one by one vs together, medians of the runs."""
    lines = ["| model | engine | requests | one by one tok/s | together tok/s | aggregate | "
             "TTFT p50 / p99 one by one | TTFT p50 / p99 together | ITL p50 / p99 one by one | "
             "ITL p50 / p99 together | ITL p99 / single-stream ITL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in cells:
        if cell.get("error"):
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


def markdown(cells: list[dict]) -> str:
    return targets_table(cells) + "\n" + ragged_table(cells)


def _worker(engine, folder: str, count: int, vocab: int, options) -> dict:
    env = worker_env(options.threads)
    if engine.backend:
        env["KILN_INT8_BACKEND"] = engine.backend
    command = worker_command(folder, "default", count, options.prompt_tokens[0], vocab,
                             options.seed, options.threads, options.device)
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          timeout=options.worker_timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": " / ".join(done.stderr.strip().splitlines()[-3:])}
    return json.loads(lines[-1])


def _server(engine, folder: str, count: int, vocab: int, options) -> dict:
    from .serving import measure_server

    prompts = fixed_prompts(count, options.prompt_tokens[0], vocab, options.seed)
    log_file = Path(options.work_dir) / f"serve-{Path(folder).name}-{count}.log"
    extra = {"KILN_INT8_BACKEND": engine.backend} if engine.backend else {}
    return measure_server(folder, prompts, FIXED_NEW, options.threads, options.runs, log_file,
                          extra)


def run_cases(models, engines, folders: list[dict], options) -> list[dict]:
    """Every (model, engine, N) in `options.runs` fresh workers, engines alternated, then the
    server; the median of each figure."""
    from .folders import tokenizer_size

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
                    record = ({"error": folder["error"]} if folder.get("error")
                              else _worker(engine, folder["path"], count, vocab, options))
                    if record.get("error"):
                        errors[label] = record["error"]
                        log(f"{model.name} {label} x{count} run {run + 1}: error: {errors[label]}")
                        continue
                    records[label].append(record)
                    log(f"{model.name} {label} x{count} run {run + 1}: threads "
                        f"{record['threads_over_one_call']:.2f}x one call (first burst "
                        f"{record['first_burst_over_one_call']:.2f}x), host "
                        f"{100 * record['host_fraction']:.1f}% of a step")
            for engine in engines:
                label, runs = str(engine), records[str(engine)]
                cell = {"model": model.name, "engine": label, "concurrency": count, "runs": runs}
                if label in errors or not runs:
                    cell["error"] = errors.get(label, "no run")
                else:
                    cell.update(summarize(runs))
                    serve = _server(engine, prepared[(model.name, label)]["path"], count, vocab,
                                    options)
                    with_server(cell, serve)
                    log(f"{model.name} {label} x{count} serve: {serve['sustained_tokens_per_s']:.1f}"
                        f" tok/s sustained = {cell['serve_over_decode']:.2f}x batch decode, TTFT "
                        f"{cell['serve_ttft_ratio']:.2f}x a lone request's")
                cells.append(cell)
    return cells


def write_outputs(results: dict, output, benchmarks_md) -> dict:
    from .publish import RESULTS_FILE, TABLE_FILE, _section_id, update_benchmarks_md

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    paths = {"results": output / RESULTS_FILE, "table": output / TABLE_FILE}
    paths["results"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    machine, runs = results["machine"], results["options"]["runs"]
    title = (f"Engine and server under concurrent callers: {machine['cpu']}, "
             f"{results['options']['threads']} threads, {machine['date'][:10]}")
    body = (f"Command: `{results['command']}`. Prompts of {results['options']['prompt_tokens'][0]} "
            f"tokens, greedy, no early stop; medians of {runs} fresh processes.\n\n"
            f"Targets. N prompts each generating {FIXED_NEW} tokens. *One call*: one "
            "`generate_batch` holding all N. *N threads*: N threads each calling `generate_batch` "
            "with one prompt, released together, on a warm engine; *first burst*: the same, as the "
            "first thing after loading. *In turn*: the N calls one after another. *Batch-N "
            "decode*: tokens/s once all N decode together. *Serve*: `kiln serve` in its own "
            f"process, {WAVES} x N streamed completions of {FIXED_NEW // 2}-{3 * FIXED_NEW // 2} "
            "tokens from an asyncio client, N in flight at any time (so they arrive at "
            "different steps): tokens/s sustained while N are in flight (the whole run's, drain "
            "included, in brackets); TTFT against a lone request's. *Host*: the time of a step spent outside "
            "the model's forward passes (planning, sampling, stop strings, events), over the "
            "one-call run.\n\n"
            + targets_table(results["cells"])
            + f"\nRagged requests ({MIN_NEW}-{MAX_NEW} new tokens each, seeded). *One by one*: "
            "each alone, start to end. *Together*: all submitted at once to one engine. "
            "Aggregate = together tok/s / one-by-one tok/s; single-stream ITL = the one-by-one "
            "ITL p50.\n\n" + ragged_table(results["cells"]))
    paths["table"].write_text(body, encoding="utf-8")
    if benchmarks_md is not None:
        update_benchmarks_md(Path(benchmarks_md), _section_id(output, Path(benchmarks_md)), title,
                             body)
        paths["benchmarks_md"] = Path(benchmarks_md)
    return paths
