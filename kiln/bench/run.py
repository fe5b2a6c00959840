"""Run the benchmark: prepare every folder once, then for each case run each engine's worker in
a fresh process, R times, alternating engines (A B C A B C ...) so drift hits them all alike.

A failure (a type kiln cannot convert yet, a worker that crashes or times out) becomes an
error in that engine's cell; the rest of the run goes on.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .folders import DEFAULT_WORK_DIR, BenchModel, EngineType, engine_folder, resolve_models
from .models import PythiaShape
from .processes import log, worker_env

DEFAULT_MODELS = ("160m", "410m", "1b", "smollm2")
DEFAULT_ENGINES = ("kiln:int8", "kiln:float32", "ctranslate2:int8", "ctranslate2:float32",
                   "transformers:float32", "transformers:bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@dataclass
class BenchOptions:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    batch: list[int] = field(default_factory=lambda: [1, 8])
    prompt_tokens: list[int] = field(default_factory=lambda: [32, 512])
    new_tokens: int = 128
    runs: int = 3
    engines: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINES))
    threads: int | None = None  # None: the physical cores
    work_dir: Path = DEFAULT_WORK_DIR
    output: Path = Path("benchmarks/results")
    benchmarks_md: Path | None = Path("BENCHMARKS.md")
    seed: int = 0
    device: str = "cpu"
    bandwidth_gib: float = 2.0
    worker_timeout_s: float = 3600.0
    model_configs: dict[str, PythiaShape] = field(default_factory=dict)  # extra Pythia shapes
    prepare_only: bool = False  # build the folders, measure nothing
    concurrency: list[int] = field(default_factory=list)  # engine runs: N requests at once

    def command(self) -> str:
        """The `kiln bench` command line that reproduces this run."""
        parts = ["kiln", "bench", "--models", *self.models, "--batch", *map(str, self.batch),
                 "--prompt-tokens", *map(str, self.prompt_tokens),
                 "--new-tokens", str(self.new_tokens), "--runs", str(self.runs),
                 "--engines", *self.engines, "--threads", str(self.threads)]
        for name, shape in self.model_configs.items():
            parts += ["--model-config", f"{name}={json.dumps(asdict(shape))}"]
        if self.device != "cpu":
            parts += ["--device", self.device]
        if self.seed:
            parts += ["--seed", str(self.seed)]
        if self.concurrency:
            parts += ["--concurrency", *map(str, self.concurrency)]
        parts += ["--output", str(self.output)]
        return shlex.join(parts)


def _prepare(models: list[BenchModel], engines: list[EngineType], work_dir: Path) -> list[dict]:
    """Every (model, engine) folder, built on first use, with its size and bytes per step."""
    from .weights import ctranslate2_bytes_per_step, folder_bytes, safetensors_bytes_per_step

    _quiet_transformers()
    folders = []
    for model in models:
        for engine in engines:
            entry: dict = {"model": model.name, "engine": str(engine)}
            start = time.perf_counter()
            try:
                path = engine_folder(model, engine, work_dir)
                if engine.engine == "ctranslate2":
                    per_step = ctranslate2_bytes_per_step(path)
                elif engine.engine == "transformers":
                    per_step = safetensors_bytes_per_step(path, ITEMSIZE.get(engine.dtype))
                else:
                    per_step = safetensors_bytes_per_step(path)
                name = (path.relative_to(work_dir).as_posix() if path.is_relative_to(work_dir)
                        else str(path))
                entry.update(path=str(path), name=name, size_bytes=folder_bytes(path),
                             bytes_per_step=per_step)
            except Exception as error:  # recorded in the engine's cells, the run goes on
                entry["error"] = f"{type(error).__name__}: {error}"
                log(f"  {model.name} {engine}: cannot prepare: {entry['error']}")
            else:
                log(f"  {model.name} {engine}: {entry['name']} ready "
                     f"({time.perf_counter() - start:.1f} s)")
            folders.append(entry)
    return folders


def _quiet_transformers() -> None:
    """No progress bars from building and converting: the harness's log is the progress."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def run_worker(engine: EngineType, folder: str, vocab: int, batch: int, prompt_tokens: int,
               options: BenchOptions, runs: int = 1) -> dict:
    compute_type = "default" if engine.engine == "kiln" else engine.dtype
    command = [sys.executable, "-m", "kiln.bench.worker", "--engine", engine.engine,
               "--model", folder, "--compute-type", compute_type, "--batch", str(batch),
               "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(options.new_tokens),
               "--threads", str(options.threads), "--runs", str(runs), "--seed", str(options.seed),
               "--vocab", str(vocab), "--device", options.device]
    try:
        env = worker_env(options.threads)
        if engine.backend:
            env["KILN_INT8_BACKEND"] = engine.backend
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=options.worker_timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {options.worker_timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    record = json.loads(lines[-1]) if lines else {}
    if done.returncode != 0 and not record.get("error"):
        tail = done.stderr.strip().splitlines()[-3:]
        record["error"] = f"worker exited with {done.returncode}: {' / '.join(tail)}"
    return record


def _describe(record: dict) -> str:
    if record.get("error"):
        return f"error: {record['error'][:200]}"
    decode = record["measurements"][0]["decode_tokens_per_s"]
    return (f"decode {decode or 0:.1f} tok/s, TTFT {record['measurements'][0]['ttft_s'] * 1000:.0f} ms, "
            f"peak RSS {record['peak_rss_bytes'] / 1024**2:.0f} MiB, load {record['load_s']:.2f} s")


def _check(options: BenchOptions) -> None:
    for name in ("runs", "threads"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(options, name)}")
    if options.new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (decoding speed needs a second token), got "
                         f"{options.new_tokens}")
    if min(options.batch, default=0) < 1 or min(options.prompt_tokens, default=0) < 1:
        raise ValueError("every batch size and prompt length must be >= 1")
    if options.concurrency and (min(options.concurrency) < 1 or any(
            not engine.startswith("kiln:") for engine in options.engines)):
        raise ValueError("--concurrency N (>= 1) measures kiln's engine: give kiln engines only, "
                         "e.g. --engines kiln:int8")


def run_bench(options: BenchOptions) -> dict:
    """Run every case and write results.json, the tables, the chart and BENCHMARKS.md (with
    `prepare_only`, just build the folders)."""
    from . import machine
    from .chart import can_draw
    from .publish import write_outputs

    options.threads = options.threads or machine.physical_cores()
    options.work_dir = Path(options.work_dir).expanduser()
    _check(options)
    engines = [EngineType.parse(text) for text in options.engines]
    models = resolve_models(options.models, options.model_configs)
    if options.prepare_only:
        log(f"kiln bench: preparing folders under {options.work_dir}")
        return {"folders": _prepare(models, engines, options.work_dir)}
    if not can_draw():
        log("kiln bench: matplotlib is not installed, so no chart will be drawn "
             "(pip install 'kiln[bench]')")
    log(f"kiln bench: measuring memory bandwidth ({options.bandwidth_gib:g} GiB)")
    bandwidth = machine.memory_bandwidth_gb_s(options.bandwidth_gib, threads=options.threads,
                                              device=options.device)
    log(f"kiln bench: {bandwidth:.1f} GB/s; preparing folders under {options.work_dir}")
    folders = _prepare(models, engines, options.work_dir)
    if options.concurrency:
        from .concurrency_run import run_cases as concurrency_cases
        from .concurrency_run import write_outputs as write_concurrency

        results = {"command": options.command(),
                   "machine": machine.describe(options.threads, options.device),
                   "bandwidth_gb_s": bandwidth, "options": _jsonable(options), "folders": folders,
                   "cells": concurrency_cases(models, engines, folders, options)}
        for name, path in write_concurrency(results, Path(options.output),
                                            options.benchmarks_md).items():
            log(f"kiln bench: wrote {name}: {path}")
        return results
    results = {"command": options.command(),
               "machine": machine.describe(options.threads, options.device),
               "bandwidth_gb_s": bandwidth, "options": _jsonable(options), "folders": folders,
               "runs": _run_cases(models, engines, folders, options)}
    paths = write_outputs(results, Path(options.output), options.benchmarks_md)
    for name, path in paths.items():
        log(f"kiln bench: wrote {name}: {path}")
    return results


def _run_cases(models: list[BenchModel], engines: list[EngineType], folders: list[dict],
               options: BenchOptions) -> list[dict]:
    """Every case, R rounds of every engine in turn; an engine that fails a case is not run
    again for that case."""
    from .folders import tokenizer_size

    prepared = {(f["model"], f["engine"]): f for f in folders}
    cases = [(m, b, p) for m in models for b in options.batch for p in options.prompt_tokens]
    total, done, runs = len(cases) * len(engines) * options.runs, 0, []
    for model, batch, prompt in cases:
        usable = [e for e in engines if not prepared[(model.name, str(e))].get("error")]
        vocab = tokenizer_size(options.work_dir / model.name / "hf") if usable else 0
        failed: set[str] = set()
        for run in range(options.runs):
            for engine in engines:
                done += 1
                label = str(engine)
                if label in failed:
                    continue
                folder = prepared[(model.name, label)]
                if folder.get("error"):
                    record = {"error": folder["error"]}
                    log(f"[{done}/{total}] {model.name} {label}: skipped, its folder failed")
                else:
                    start = time.perf_counter()
                    record = run_worker(engine, folder["path"], vocab, batch, prompt, options)
                    log(f"[{done}/{total}] {model.name} batch {batch} prompt {prompt} run "
                         f"{run + 1} {label}: {_describe(record)} "
                         f"({time.perf_counter() - start:.1f} s)")
                if record.get("error"):
                    failed.add(label)
                runs.append({**record, "model": model.name, "label": label, "batch": batch,
                             "prompt_tokens": prompt, "run_index": run})
    return runs


def _jsonable(options: BenchOptions) -> dict:
    data = asdict(options)
    for key, value in data.items():
        if isinstance(value, Path):
            data[key] = str(value)
    return data


def parse_model_config(text: str) -> tuple[str, PythiaShape]:
    """`NAME={"hidden_size": 64, "num_layers": 2, "num_heads": 4, ...}`: an extra Pythia shape."""
    name, _, spec = text.partition("=")
    try:
        return name, PythiaShape(**json.loads(spec))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"--model-config {text!r} is not NAME=JSON with PythiaShape fields "
                         f"(hidden_size, num_layers, num_heads, vocab_size, tokenizer_size, "
                         f"max_positions): {error}") from error


def options_from_args(args) -> BenchOptions:
    configs = dict(parse_model_config(text) for text in args.model_config or [])
    models = args.models or (list(configs) if configs else list(DEFAULT_MODELS))
    return BenchOptions(
        models=models, batch=args.batch, prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens, runs=args.runs, engines=args.engines, threads=args.threads,
        work_dir=Path(args.work_dir), output=Path(args.output),
        benchmarks_md=None if args.no_benchmarks_md else Path(args.benchmarks_md),
        seed=args.seed, device=args.device, bandwidth_gib=args.bandwidth_gib,
        worker_timeout_s=args.worker_timeout, model_configs=configs,
        prepare_only=args.prepare_only, concurrency=args.concurrency or [])
