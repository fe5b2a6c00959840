"""`kiln serve` under generated and sustained abuse, against a real server process:
- property-based fuzzing (hypothesis): thousands of requests built from the OpenAI schema's
  fields with values of every JSON type, plus random bodies, headers and paths: zero 5xx, the
  server healthy and every KV slot free afterwards;
- 64 concurrent streams give the text they give one at a time;
- a soak mixing streams, disconnects and bad requests: RSS flat, slots back to 0.

KILN_FUZZ_REQUESTS / KILN_SOAK_REQUESTS change the counts (default 2000 each).
"""

from __future__ import annotations

import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import save_hf_model, tiny_gpt_neox
from .serving import API_KEY, start_server

VOCAB = 90
FUZZ_REQUESTS = int(os.environ.get("KILN_FUZZ_REQUESTS", "2000"))
SOAK_REQUESTS = int(os.environ.get("KILN_SOAK_REQUESTS", "2000"))
CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
                 "{% if add_generation_prompt %}t5{% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    folder = save_hf_model(tiny_gpt_neox(max_position_embeddings=512), root / "hf",
                           tokenizer_vocab=VOCAB)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    running = start_server(root, "--model", str(folder), "--compute-type", "float32",
                           "--cache-dir", str(root / "cache"), "--served-model-name", "tiny",
                           "--max-batch-size", "8", "--max-queue", "64",
                           "--max-queue-per-client", "64")
    yield running
    assert running.stop() == 0


# ------------------------------------------------------------ generated requests

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
small_int = st.one_of(st.integers(-3, 20), json_value)
words = st.lists(st.integers(0, 120).map(lambda i: f"t{i}"), max_size=12).map(" ".join)
text = st.one_of(words, st.text(max_size=30))
prompt = st.one_of(text, st.lists(text, max_size=3), st.lists(st.integers(-5, 120), max_size=12),
                   st.lists(st.lists(st.integers(-5, 120), max_size=6), max_size=3), json_value)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "x"])},
    optional={"content": st.one_of(text, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": text}), max_size=2),
        json_value), "name": text})
common = {
    "model": st.one_of(st.just("tiny"), text), "max_tokens": small_int,
    "temperature": st.one_of(st.floats(-1, 3), st.sampled_from([0, 1e-40, 1e-300]), json_value),
    "top_p": st.one_of(st.floats(-0.5, 1.5), json_value), "top_k": small_int,
    "min_tokens": small_int, "seed": st.one_of(st.integers(-2**70, 2**70), json_value),
    "stop": st.one_of(text, st.lists(text, max_size=6), json_value),
    "n": st.one_of(st.integers(-1, 20), json_value), "stream": st.one_of(st.booleans(), json_value),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}),
                                json_value),
    "repetition_penalty": st.one_of(st.floats(-1, 3), json_value),
    "presence_penalty": st.one_of(st.floats(-3, 3), json_value),
    "logit_bias": json_value, "user": json_value, "metadata": json_value,
    "prompt_lookup": json_value, "num_speculative_tokens": small_int,
}
extra_fields = st.dictionaries(st.text(max_size=10), json_value, max_size=2)


def with_extra(fields):
    """`fields`, sometimes with unknown ones besides."""
    return st.tuples(fields, st.one_of(st.just({}), extra_fields)).map(
        lambda pair: {**pair[1], **pair[0]})


completion = with_extra(st.fixed_dictionaries({"prompt": prompt}, optional={
    **common, "logprobs": small_int, "echo": json_value, "suffix": json_value,
    "best_of": small_int}))
chat = with_extra(st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), json_value)},
    optional={**common, "logprobs": json_value, "top_logprobs": small_int, "tools": json_value,
              "response_format": json_value, "max_completion_tokens": small_int}))
request = st.one_of(
    st.tuples(st.just("/v1/completions"), completion.map(json.dumps)),
    st.tuples(st.just("/v1/chat/completions"), chat.map(json.dumps)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models",
                               "/v1/models/tiny", "/health", "/nothing", "/v1/completions/x"]),
              st.one_of(st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
                        json_value.map(json.dumps))),
)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.sampled_from(["application/json", "text/plain", "", "application/json; x",
                                     "multipart/form-data"]),
    # (values as HTTP allows them: no surrounding white space, no control characters)
    "Authorization": st.one_of(st.just(f"Bearer {API_KEY}"), st.text(
        st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f"),
        max_size=20).map(str.strip)),
    "X-Request-Id": st.text(st.characters(min_codepoint=32, max_codepoint=126),
                            max_size=40).map(str.strip),
    "Accept": st.sampled_from(["*/*", "text/event-stream", "application/json"]),
})


def test_fuzzed_requests_never_get_a_5xx(server):
    statuses: dict[int, int] = {}
    failures: list[tuple] = []
    client = httpx.Client(timeout=60)

    @settings(max_examples=FUZZ_REQUESTS, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request, headers, st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]))
    def one(path_body, request_headers, method):
        path, body = path_body
        all_headers = {"Content-Type": "application/json",
                       "Authorization": f"Bearer {API_KEY}", **request_headers}
        encoded = {name: value.encode("latin-1") for name, value in all_headers.items()}
        response = client.request(method, server.url + path, content=body.encode("utf-8",
                                  "surrogatepass"), headers=encoded)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append((method, path, body[:300], all_headers, response.text[:300]))
        elif response.status_code >= 400 and path.startswith("/v1"):
            error = response.json()["error"]  # OpenAI's shape, always
            assert error["message"] and error["type"]

    one()
    print("statuses:", dict(sorted(statuses.items())))
    assert not failures, failures[:5]
    assert sum(statuses.values()) >= FUZZ_REQUESTS
    assert statuses.get(200, 0) > FUZZ_REQUESTS // 50  # the generator reaches valid requests too
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_until(lambda: server.metrics()["kiln_slots_in_use"] == 0, 30, "slots free")


# ------------------------------------------------------------ concurrency


def completion_text(server, prompt: str, tokens: int, stream: bool) -> str:
    body = {"prompt": prompt, "max_tokens": tokens, "min_tokens": tokens, "temperature": 0}
    if not stream:
        return server.post("/v1/completions", body).json()["choices"][0]["text"]
    pieces = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      headers=server.headers, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(pieces)


def test_64_concurrent_streams_equal_their_sequential_text(server):
    rng = random.Random(0)
    prompts = [" ".join(f"t{rng.randrange(5, VOCAB)}" for _ in range(rng.randrange(1, 20)))
               for _ in range(64)]
    alone = [completion_text(server, p, 24, stream=False) for p in prompts]
    with ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda p: completion_text(server, p, 24, stream=True), prompts))
    assert together == alone


# ------------------------------------------------------------ soak


def test_soak_streams_disconnects_and_bad_requests(server):
    """SOAK_REQUESTS requests, 8 at a time: whole answers, streams read to the end, streams
    dropped after a few chunks, and bad requests. RSS grows < 20 MB after a warm-up, no 5xx,
    and every slot is free at the end."""
    rng = random.Random(1)
    kinds = ["whole", "stream", "drop", "bad"]
    plan = [(rng.choice(kinds), rng.randrange(1, 40), rng.randrange(1, 1000))
            for _ in range(SOAK_REQUESTS)]
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def run(item):
        kind, tokens, seed = item
        body = {"prompt": f"t{seed % 80 + 5} t{seed % 7 + 5}", "max_tokens": tokens,
                "temperature": 0.8, "seed": seed}
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            if kind == "whole":
                status = client.post(server.url + "/v1/completions", json=body).status_code
            elif kind == "bad":
                status = client.post(server.url + "/v1/completions",
                                     json={**body, "n": 0, "guided_json": {}}).status_code
            else:
                with client.stream("POST", server.url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": body["prompt"]}],
                        "max_tokens": 200 if kind == "drop" else tokens, "stream": True,
                        "seed": seed}) as response:
                    status = response.status_code
                    for index, _ in enumerate(response.iter_lines()):
                        if kind == "drop" and index >= seed % 6:
                            break  # leave mid-stream: the connection is closed
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    warm_up = max(SOAK_REQUESTS // 10, 1)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, plan[:warm_up]))
        server.wait_until(lambda: server.metrics()["kiln_slots_in_use"] == 0, 30, "slots free")
        rss_before = server.rss_bytes()
        list(pool.map(run, plan[warm_up:]))
    server.wait_until(lambda: server.metrics()["kiln_slots_in_use"] == 0, 30, "slots free")
    growth = server.rss_bytes() - rss_before
    print(f"soak: {dict(sorted(statuses.items()))}, RSS growth {growth / 2**20:.1f} MiB")
    assert all(status < 500 for status in statuses), statuses
    assert growth < 20 * 2**20
    assert httpx.get(server.url + "/health").status_code == 200
