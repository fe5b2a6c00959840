"""`kiln serve --ray` as users meet it: a real process starting a local Ray with 2 replicas of
a tiny model on a free port, the `openai` client, concurrent requests, backpressure (429),
a client disconnect, and shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import httpx
import pytest

import kiln

from .conftest import save_hf_model, tiny_gpt_neox
from .serving import API_KEY, start_server

pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

VOCAB = 90
LONG = 3000  # tokens of a "long" request: seconds of work for the tiny model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    source = save_hf_model(tiny_gpt_neox(seed=7, max_position_embeddings=4096), root / "hf",
                           tokenizer_vocab=VOCAB)
    return kiln.convert(source, root / "kiln")


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ray-logs")
    # One slot per replica and two requests queued: two long requests fill both replicas.
    running = start_server(logs, "--ray", "--replicas", "2", "--num-cpus-per-replica", "1",
                           "--model", str(folder), "--compute-type", "float32",
                           "--max-batch-size", "1", "--max-queue", "2", "--warm-up", "0",
                           "--served-model-name", "tiny", timeout=240)
    # /health answers once one replica is up: wait for the second too
    running.wait_until(lambda: len(replica_metrics(running)) == 2, 120, "both replicas up")
    yield running
    if running.process.poll() is None:
        running.stop()


def completion(server, prompt: str, max_tokens: int):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"min_tokens": max_tokens})
    return raw.headers["x-kiln-replica"], raw.parse().choices[0].text


def test_requests_reach_both_replicas_and_equal_a_single_engine(server, folder):
    prompts = ["t5 t6 t7", "t9 t10"]
    results: dict[int, tuple[str, str]] = {}

    def ask(index: int) -> None:  # long enough that both run at once: one slot per replica
        results[index] = completion(server, prompts[index], 400)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len({replica for replica, _ in results.values()}) == 2
    reference = kiln.Generator(folder, compute_type="float32")
    for index, prompt in enumerate(prompts):
        expected = reference.generate(prompt, max_length=400, min_length=400,
                                      include_prompt_in_result=False)
        assert results[index][1].split() == expected.split()  # the same 400 tokens


def test_full_queues_give_429_with_retry_after(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=server.headers, timeout=120) as client:
            # Seconds of work each, so all 12 arrive while the first ones still run.
            body = {"model": "tiny", "prompt": "t5", "max_tokens": LONG, "min_tokens": LONG}
            return await asyncio.gather(*[client.post(server.url + "/v1/completions", json=body)
                                          for _ in range(12)])

    responses = asyncio.run(burst())
    codes = sorted(response.status_code for response in responses)
    # 2 replicas x 1 slot running, 2 requests queued: of 12 at once, at least 6 are refused.
    assert codes.count(200) >= 2 and codes.count(429) >= 6, codes
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.headers["retry-after"] == "1"


def replica_metrics(server) -> dict[str, dict[str, float]]:
    """/metrics of every replica, by replica id (the proxy picks one per request)."""
    seen: dict[str, dict[str, float]] = {}
    for _ in range(40):
        response = httpx.get(server.url + "/metrics", timeout=10)
        values = {}
        for line in response.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        seen[response.headers["x-kiln-replica"]] = values
        if len(seen) == 2:
            break
    return seen


def total(metrics: dict[str, dict[str, float]], name: str) -> float:
    return sum(values.get(name, 0.0) for values in metrics.values())


def test_a_disconnect_cancels_the_request_in_its_replica(server):
    before = replica_metrics(server)
    assert len(before) == 2
    opened = threading.Event()

    def read_then_leave() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers,
                          timeout=60, json={"model": "tiny", "prompt": "t9", "stream": True,
                                            "max_tokens": LONG, "min_tokens": LONG}) as response:
            for line in response.iter_lines():
                if line:
                    opened.set()
                    return  # leaving the block drops the connection mid-stream

    reader = threading.Thread(target=read_then_leave)
    reader.start()
    assert opened.wait(60)
    reader.join(30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = replica_metrics(server)
        if len(metrics) == 2 and all(m["kiln_kv_slots_used"] == 0 for m in metrics.values()):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"a slot stayed busy after the client left: {metrics}")
    assert total(metrics, "kiln_requests_aborted_total") - \
        total(before, "kiln_requests_aborted_total") == 1
    generated = total(metrics, "kiln_generation_tokens_total") - \
        total(before, "kiln_generation_tokens_total")
    assert generated < LONG / 2  # the long stream stopped early


def test_shutdown_is_clean(server):
    assert server.stop(timeout=90) == 0
    leftovers = subprocess.run(["pgrep", "-f", "--", f"--port {server.port}"],
                               capture_output=True)
    assert leftovers.stdout.strip() == b""
