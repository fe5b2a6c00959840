"""OpenAI-compatible servers under load, side by side on this machine: `kiln serve`,
`transformers serve --continuous-batching` and CTranslate2 behind a minimal FastAPI endpoint
(benchmarks/ct2_server.py), all serving SmolLM2-135M-Instruct.

Each server runs alone, in its own process; a load generator (the `openai` async client)
keeps C streamed completions in flight (C = 1, 4, 8, 16) over the same requests (prompts of
~14 tokens, greedy, max_tokens drawn from 16-128 with a fixed seed) and reports requests/s,
output tokens/s (the outputs re-tokenized with SmolLM2's tokenizer, so every server is
counted alike), time to first token and inter-token latency (p50/p99).

    python benchmarks/serve_bench.py [--servers kiln transformers ctranslate2]
        [--concurrency 1 4 8 16] [--requests 32] [--runs 1] [--output benchmarks/results-serve]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("kiln", "transformers", "ctranslate2")
TOPICS = ["the history of the Roman Empire", "how bread is baked", "the life of bees",
          "the first flight to the Moon", "how a computer stores numbers", "the oceans of Earth",
          "a walk through an old city", "how rivers shape valleys", "the rules of chess",
          "the invention of the printing press", "why the sky is blue", "a day on a farm"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def folders(work_dir: Path) -> dict[str, Path]:
    from kiln.bench.folders import EngineType, engine_folder, hf_folder, resolve_models

    model = resolve_models(["smollm2"])[0]
    return {"hf": hf_folder(model, work_dir),
            "ct2": engine_folder(model, EngineType.parse("ctranslate2:int8"), work_dir)}


def server_command(name: str, port: int, paths: dict[str, Path], slots: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    if name == "kiln":
        return [str(bin_dir / "kiln"), "serve", "--port", str(port), "--max-batch-size",
                str(slots), "--max-queue", "1024", "--max-queue-per-client", "1024",
                "--log-level", "warning"]
    if name == "transformers":
        return [str(bin_dir / "transformers"), "serve", "--continuous-batching", str(paths["hf"]),
                "--device", "cpu", "--port", str(port), "--host", "127.0.0.1",
                "--log-level", "warning"]
    return [sys.executable, str(ROOT / "benchmarks" / "ct2_server.py"), "--model",
            str(paths["ct2"]), "--tokenizer", str(paths["hf"]), "--port", str(port)]


def start(name: str, paths: dict[str, Path], slots: int, log: Path):
    port = free_port()
    process = subprocess.Popen(server_command(name, port, paths, slots), stdout=log.open("wb"),
                               stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="2"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited:\n{log.read_text()[-3000:]}")
        try:
            health = "/health" if name != "transformers" else "/v1/models"
            if httpx.get(url + health, timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{name} server did not start:\n{log.read_text()[-3000:]}")


def requests_for(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Here is a detailed essay about {rng.choice(TOPICS)}.\n\n",
             "max_tokens": rng.randint(16, 128)} for _ in range(count)]


async def run_load(url: str, model: str, requests: list[dict], concurrency: int,
                   count_tokens) -> dict:
    from openai import AsyncOpenAI

    semaphore = asyncio.Semaphore(concurrency)
    ttft, itl, tokens = [], [], []

    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                           timeout=600) as api:
        async def one(request: dict) -> None:
            async with semaphore:
                sent = time.perf_counter()
                stream = await api.completions.create(model=model, temperature=0, stream=True,
                                                      **request)
                text, last = "", None
                async for chunk in stream:
                    piece = chunk.choices[0].text if chunk.choices else ""
                    if not piece:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - sent)
                    else:
                        itl.append(now - last)
                    last, text = now, text + piece
                tokens.append(count_tokens(text))

        start = time.perf_counter()
        await asyncio.gather(*(one(r) for r in requests))
        wall = time.perf_counter() - start
    return {"requests_per_s": len(requests) / wall, "tokens_per_s": sum(tokens) / wall,
            "ttft_p50_ms": 1000 * _quantile(ttft, 0.5), "ttft_p99_ms": 1000 * _quantile(ttft, 0.99),
            "itl_p50_ms": 1000 * _quantile(itl, 0.5), "itl_p99_ms": 1000 * _quantile(itl, 0.99),
            "tokens": sum(tokens), "wall_s": wall}


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=32, help="per concurrency level")
    parser.add_argument("--runs", type=int, default=1, help="repetitions (medians reported)")
    parser.add_argument("--work-dir", default="~/.cache/kiln/bench")
    parser.add_argument("--output", default="benchmarks/results-serve")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    from kiln.bench.machine import describe

    paths = folders(Path(args.work_dir).expanduser())
    tokenizer = Tokenizer.from_file(str(paths["hf"] / "tokenizer.json"))

    def count_tokens(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": describe(threads=os.cpu_count() or 1), "rows": []}
    for run in range(args.runs):
        for name in args.servers:
            process, url = start(name, paths, max(args.concurrency), output / f"{name}.log")
            try:
                model = {"kiln": "SmolLM2-135M-Instruct", "transformers": str(paths["hf"]),
                         "ctranslate2": "ctranslate2"}[name]
                asyncio.run(run_load(url, model, requests_for(4, 99), 4, count_tokens))  # warm
                for concurrency in args.concurrency:
                    row = asyncio.run(run_load(url, model, requests_for(args.requests, 0),
                                               concurrency, count_tokens))
                    row.update(server=name, concurrency=concurrency, run=run)
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
            finally:
                process.terminate()
                process.wait(60)
    (output / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


def table(results: dict) -> str:
    rows = results["rows"]
    keys = ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
            "itl_p99_ms")
    lines = ["| server | concurrency | requests/s | output tok/s | TTFT p50 ms | TTFT p99 ms | "
             "ITL p50 ms | ITL p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["server"] for r in rows):
        for concurrency in dict.fromkeys(r["concurrency"] for r in rows):
            runs = [r for r in rows if r["server"] == name and r["concurrency"] == concurrency]
            if runs:
                values = [statistics.median(r[k] for r in runs) for k in keys]
                lines.append(f"| {name} | {concurrency} | " + " | ".join(
                    f"{v:.2f}" if k == "requests_per_s" else f"{v:.1f}"
                    for k, v in zip(keys, values, strict=True)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
