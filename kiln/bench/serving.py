"""`kiln serve` under load, for `kiln bench --concurrency N`: a real server process on a free
port of 127.0.0.1 and an asyncio client streaming completions (token-id prompts, greedy, no
early stop: min_tokens = max_tokens).

- alone: one request at a time, a few times, `new_tokens` each: its time to first token;
- together: N requests kept in flight, a new one as soon as one ends (WAVES x N in all),
  each of `new_tokens` / 2 to 3 x `new_tokens` / 2 tokens (seeded), so that they end and
  arrive at different steps, as a server's clients do. Sustained output tokens/s: the tokens
  received while N were in flight (from the first request sent to the last one sent; after
  that the run drains, fewer and fewer requests at a time) over that time. Also the whole
  run's tokens/s, drain included, and the time to first token of each request (p50).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ALONE_REQUESTS = 3
WAVES = 4  # requests per run: WAVES x N, N at a time
SERVED_NAME = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: str, slots: int, env: dict[str, str], log: Path,
                 timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "kiln", "serve", "--model", folder, "--port", str(port),
               "--max-batch-size", str(slots), "--max-queue", "1024", "--log-level", "warning",
               "--served-model-name", SERVED_NAME]
    # Not from the current folder: the kiln on PYTHONPATH (env) is the one measured.
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                               cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"kiln serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"kiln serve did not become healthy within {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def _stream(client, url: str, prompt: list[int], new_tokens: int) -> dict:
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": new_tokens,
            "min_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    chunks: list[float] = []  # arrival of each chunk of text (a token, or a few held back)
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                chunks.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"sent": sent, "first": chunks[0], "last": time.perf_counter(), "tokens": tokens,
            "chunks": chunks}


def sustained(answers: list[dict]) -> float:
    """Tokens/s while every slot of the load was busy: chunks received between the first
    request sent and the last one sent, scaled by the run's tokens per chunk."""
    begin, end = min(a["sent"] for a in answers), max(a["sent"] for a in answers)
    inside = sum(1 for a in answers for t in a["chunks"] if begin <= t <= end)
    per_chunk = sum(a["tokens"] for a in answers) / sum(len(a["chunks"]) for a in answers)
    return inside * per_chunk / (end - begin)


async def _load(url: str, prompts: list[list[int]], new_tokens: int, runs: int) -> dict:
    import random

    import httpx

    picker = random.Random(0)
    lengths = [picker.randint(new_tokens // 2, 3 * new_tokens // 2)
               for _ in range(WAVES * len(prompts))]

    async with httpx.AsyncClient(timeout=None) as client:
        # warm-up: every row count the together runs will use, and one lone request
        await asyncio.gather(*(_stream(client, url, p, 4) for p in prompts))
        await _stream(client, url, prompts[0], 4)
        alone = [await _stream(client, url, prompts[i % len(prompts)], new_tokens)
                 for i in range(ALONE_REQUESTS)]
        together = []
        for _ in range(runs):
            in_flight = asyncio.Semaphore(len(prompts))

            async def one(prompt, length, in_flight=in_flight):
                async with in_flight:
                    return await _stream(client, url, prompt, length)

            answers = await asyncio.gather(*(one(p, n) for p, n in zip(prompts * WAVES, lengths,
                                                                       strict=True)))
            begin = min(a["sent"] for a in answers)
            wall = max(a["last"] for a in answers) - begin
            together.append({"tokens_per_s": sum(a["tokens"] for a in answers) / wall,
                             "sustained_tokens_per_s": sustained(answers),
                             "ttft_p50_s": statistics.median(a["first"] - a["sent"] for a in answers),
                             "tokens": sum(a["tokens"] for a in answers)})
    return {"alone_ttft_p50_s": statistics.median(a["first"] - a["sent"] for a in alone),
            "alone_tokens_per_s": statistics.median(a["tokens"] / (a["last"] - a["sent"])
                                                    for a in alone),
            "together_tokens_per_s": statistics.median(t["tokens_per_s"] for t in together),
            "sustained_tokens_per_s": statistics.median(t["sustained_tokens_per_s"]
                                                        for t in together),
            "together_ttft_p50_s": statistics.median(t["ttft_p50_s"] for t in together),
            "together_tokens": together[0]["tokens"], "together_requested": sum(lengths),
            "runs": together}


def measure_server(folder: str, prompts: list[list[int]], new_tokens: int, threads: int,
                   runs: int, log: Path, extra_env: dict[str, str] | None = None) -> dict:
    """Start `kiln serve` on `folder` with len(prompts) slots, load it, stop it."""
    from .processes import worker_env

    env = {**worker_env(threads), **(extra_env or {})}
    process, url = start_server(folder, len(prompts), env, log)
    try:
        return asyncio.run(_load(url, prompts, new_tokens, runs))
    finally:
        stop_server(process)
