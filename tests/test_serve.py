"""`kiln serve` as users meet it: a real server process on a free port, the real `openai`
client (sync and async) and raw HTTP; greedy output checked against transformers."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
import torch

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox
from .serving import API_KEY, start_server

openai = pytest.importorskip("openai")

VOCAB = 90  # the tokenizer's; the model has 96 embedding rows
EOS = 2
CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
                 "{% if add_generation_prompt %}t5{% endif %}")
LONG = 3000  # tokens a "long" request generates (end tokens barred): seconds of work


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, HF folder with a word-level tokenizer and a chat template)."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny_gpt_neox(max_position_embeddings=4096)
    folder = save_hf_model(model, root / "hf", tokenizer_vocab=VOCAB)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return model, folder


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    _, folder = tiny
    logs = tmp_path_factory.mktemp("serve-logs")
    running = start_server(logs, "--model", str(folder), "--compute-type", "float32",
                           "--cache-dir", str(logs / "cache"), "--max-batch-size", "4",
                           "--max-queue", "16", "--max-queue-per-client", "16",
                           "--served-model-name", "tiny")
    yield running
    assert running.stop() == 0


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, **kwargs)


def words(ids):
    return " ".join(f"t{i}" for i in ids)


def reference_greedy(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens (cut at EOS) and their log-probs."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True,
                             suppress_tokens=list(range(VOCAB, model.config.vocab_size)))
    ids = out.sequences[0, len(prompt):].tolist()
    with torch.inference_mode():
        logits = model(out.sequences).logits[0, len(prompt) - 1:-1]
    log_probs = logits.log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist()
    if EOS in ids:
        cut = ids.index(EOS)
        ids, log_probs = ids[:cut], log_probs[:cut]
    return ids, log_probs


def test_greedy_completion_matches_transformers(server, tiny):
    model, _ = tiny
    prompt = random_prompt(12, VOCAB, seed=3)
    expected, expected_log_probs = reference_greedy(model, prompt, 24)
    response = client(server).completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                 temperature=0, logprobs=3)
    choice = response.choices[0]
    tokens = [int(token[1:]) for token in choice.logprobs.tokens]
    assert tokens == expected
    assert choice.finish_reason == ("stop" if len(expected) < 24 else "length")
    assert choice.logprobs.token_logprobs == pytest.approx(expected_log_probs, abs=1e-4)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert response.usage.prompt_tokens == 12
    assert response.usage.completion_tokens == len(expected)
    assert response.usage.total_tokens == 12 + len(expected)


def test_streamed_text_equals_whole_text(server):
    api = client(server)
    for chat in (False, True):
        kwargs = dict(model="tiny", max_tokens=20, temperature=0.8, seed=7, n=2)
        if chat:
            create = api.chat.completions.create
            kwargs["messages"] = [{"role": "user", "content": "t7 t8 t9"}]
        else:
            create = api.completions.create
            kwargs["prompt"] = "t7 t8 t9 t10"
        whole = create(**kwargs)
        texts, finishes, usage = ["", ""], [[], []], None
        for chunk in create(stream=True, stream_options={"include_usage": True}, **kwargs):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = choice.delta.content if chat else choice.text
                texts[choice.index] += piece or ""
                if choice.finish_reason is not None:
                    finishes[choice.index].append(choice.finish_reason)
        expected = [c.message.content if chat else c.text for c in
                    sorted(whole.choices, key=lambda c: c.index)]
        assert texts == expected
        assert texts[0] != texts[1]  # two seeded samples, each its own stream
        assert [f for f in finishes] == [[c.finish_reason] for c in
                                         sorted(whole.choices, key=lambda c: c.index)]
        assert usage.completion_tokens == whole.usage.completion_tokens
        assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={"model": "tiny", "prompt": "t5 t6", "max_tokens": 8,
                            "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])


def test_concurrent_greedy_requests_equal_one_by_one(server):
    prompts = [random_prompt(3 + 5 * i % 37, VOCAB, seed=100 + i) for i in range(16)]
    lengths = [8 + (i * 13) % 40 for i in range(16)]

    def body(i):
        return dict(model="tiny", prompt=words(prompts[i]), max_tokens=lengths[i], temperature=0)

    api = client(server)
    alone = [api.completions.create(**body(i)).choices[0].text for i in range(16)]

    async def together():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0) as async_api:
            responses = await asyncio.gather(*(async_api.completions.create(**body(i))
                                               for i in range(16)))
        return [r.choices[0].text for r in responses]

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 8


def test_prompt_lookup_extension_gives_the_same_greedy_text(server):
    prompt = words(random_prompt(9, VOCAB, seed=21) * 3)
    api = client(server)
    plain = api.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
    fast = api.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0,
                                  extra_body={"prompt_lookup": True, "num_speculative_tokens": 6})
    assert fast.choices[0].text == plain.choices[0].text
    assert fast.usage == plain.usage


def test_chat_completion_uses_the_template(server, tiny):
    model, _ = tiny
    prompt = [3, 7, 8, 4, 5]  # the template renders "t3 t7 t8 t4 t5"
    expected, _ = reference_greedy(model, prompt, 10)
    response = client(server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "t7 t8"}], max_tokens=10,
        temperature=0, logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert [int(entry.token[1:]) for entry in choice.logprobs.content] == expected
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    assert response.usage.prompt_tokens == len(prompt)
    assert choice.message.role == "assistant"


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200  # open without a key


BAD_REQUESTS = [  # (path, body, extra headers, status, param)
    ("/v1/completions", {"prompt": "t5", "temperature": -1}, {}, 400, "temperature"),
    ("/v1/completions", {"prompt": "t5", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "t5", "n": 0}, {}, 400, "n"),
    ("/v1/completions", {"prompt": "t5", "stop": ["a", "b", "c", "d", "e"]}, {}, 400, "stop"),
    ("/v1/completions", {"prompt": "t5", "presence_penalty": 0.5}, {}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "t5", "logprobs": 9}, {}, 400, "logprobs"),
    ("/v1/completions", {"prompt": [5, 999]}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, {}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "t5 " * 5000, "max_tokens": 200}, {}, 400, "prompt"),
    ("/v1/completions", {"prompt": "t5 " * 4000, "max_tokens": 200}, {}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "t5", "max_tokens": 5000}, {}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "t5", "model": "gpt-4"}, {}, 404, "model"),
    ("/v1/completions", "{not json", {}, 400, None),
    ("/v1/completions", "[1, 2]", {}, 400, None),
    ("/v1/completions", {"prompt": "t5"}, {"Authorization": "Bearer wrong"}, 401, None),
    ("/v1/completions", {"prompt": "t5"}, {"Authorization": ""}, 401, None),
    ("/v1/chat/completions", {"messages": []}, {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, {}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "t5"}],
                              "tools": [{"type": "function"}]}, {}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "t5"}],
                              "stream_options": {"include_usage": True}}, {}, 400,
     "stream_options"),
    ("/v1/embeddings", {"input": "t5"}, {}, 400, "model"),  # a generator: no embeddings
]


@pytest.mark.parametrize("path, body, headers, status, param", BAD_REQUESTS)
def test_bad_request_is_refused_and_the_server_still_serves(server, path, body, headers, status,
                                                            param):
    response = server.post(path, body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    ok = server.post("/v1/completions", {"prompt": "t5 t6", "max_tokens": 2})
    assert ok.status_code == 200
    assert server.metrics()["kiln_kv_slots_used"] == 0


def _long_stream(server, opened: threading.Event, stop: threading.Event, chunks: list):
    """Read a long streamed completion until `stop`, then drop the connection."""
    with httpx.stream("POST", server.url + "/v1/completions", headers=server.headers, timeout=60,
                      json={"prompt": "t9 t10", "max_tokens": LONG, "min_tokens": LONG,
                            "stream": True}) as response:
        for line in response.iter_lines():
            if line:
                chunks.append(line)
                opened.set()
            if stop.is_set():
                return  # leaving the block closes the connection mid-stream


def test_disconnect_mid_stream_frees_the_slot(server):
    opened, stop, chunks = threading.Event(), threading.Event(), []
    reader = threading.Thread(target=_long_stream, args=(server, opened, stop, chunks))
    reader.start()
    assert opened.wait(30)
    assert server.metrics()["kiln_requests_running"] == 1
    generated = server.metrics()["kiln_generation_tokens_total"]
    stop.set()
    reader.join(10)
    freed_after = server.wait_until(lambda: server.metrics()["kiln_kv_slots_used"] == 0, 5,
                                    "slot freed")
    assert freed_after < 1.0  # a decode step here is ~2 ms; the rest is polling and HTTP
    after = server.metrics()
    assert after["kiln_generation_tokens_total"] - generated < LONG / 2
    assert after["kiln_requests_aborted_total"] >= 1
    assert not any("[DONE]" in line for line in chunks)


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", {"prompt": "t9", "max_tokens": LONG, "min_tokens": LONG},
                    timeout=0.5)
    server.wait_until(lambda: server.metrics()["kiln_kv_slots_used"] == 0, 5, "slot freed")


def test_full_queue_gives_429_then_serves(server):
    """4 slots busy with long streams, 16 requests waiting: one more is refused with 429."""
    stop = threading.Event()
    readers = []
    for _ in range(4):
        opened = threading.Event()
        readers.append((threading.Thread(target=_long_stream, args=(server, opened, stop, [])),
                        opened))
        readers[-1][0].start()
    assert all(opened.wait(30) for _, opened in readers)
    waiting = []

    def short(i):
        waiting.append(server.post("/v1/completions", {"prompt": "t5", "max_tokens": 2}))

    threads = [threading.Thread(target=short, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    server.wait_until(lambda: server.metrics()["kiln_requests_waiting"] == 16, 10, "16 queued")
    refused = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 2})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert server.metrics()['kiln_requests_rejected_total{reason="rate_limit_exceeded"}'] >= 1
    stop.set()  # the long streams leave; the queued requests run
    for thread, _ in readers:
        thread.join(10)
    for thread in threads:
        thread.join(60)
    assert [r.status_code for r in waiting] == [200] * 16
    server.wait_until(lambda: server.metrics()["kiln_kv_slots_used"] == 0, 5, "slots free")


def test_soak_no_memory_growth(server):
    """500 short requests at concurrency 8: RSS after them is within noise of after 100."""

    async def run(count: int) -> None:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                      max_retries=0) as api:
            semaphore = asyncio.Semaphore(8)

            async def one(i: int) -> None:
                async with semaphore:
                    response = await api.completions.create(
                        model="tiny", prompt=words(random_prompt(4 + i % 9, VOCAB, seed=i)),
                        max_tokens=4 + i % 5, temperature=0.5, seed=i, stream=bool(i % 2))
                    if i % 2:
                        async for _ in response:
                            pass

            await asyncio.gather(*(one(i) for i in range(count)))

    asyncio.run(run(100))
    before = server.rss_bytes()
    asyncio.run(run(400))
    growth = server.rss_bytes() - before
    print(f"RSS growth over 400 requests after 100 warm-up ones: {growth / 2**20:.1f} MiB")
    assert growth < 16 * 2**20
    assert server.metrics()["kiln_kv_slots_used"] == 0


def test_sigterm_drains_streams_in_flight(tiny, tmp_path):
    _, folder = tiny
    server = start_server(tmp_path, "--model", str(folder), "--cache-dir", str(tmp_path / "c"),
                          "--max-batch-size", "2", "--shutdown-timeout", "60", api_key=None)
    lines: list[str] = []
    opened = threading.Event()

    def read() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"prompt": "t9", "max_tokens": 1500, "min_tokens": 1500,
                                "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    opened.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert opened.wait(30)
    server.process.send_signal(signal.SIGTERM)
    server.wait_until(lambda: httpx.get(server.url + "/health").status_code == 503, 5, "draining")
    refused = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 2})
    assert refused.status_code == 503
    assert server.process.wait(60) == 0
    reader.join(10)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2].removeprefix("data: "))["choices"][0]
    assert last["finish_reason"] == "length"


def test_shutdown_timeout_aborts_what_is_left(tiny, tmp_path):
    _, folder = tiny
    server = start_server(tmp_path, "--model", str(folder), "--cache-dir", str(tmp_path / "c"),
                          "--shutdown-timeout", "0.5", api_key=None)
    result = {}

    def read() -> None:
        result["response"] = server.post("/v1/completions",
                                         {"prompt": "t9", "max_tokens": LONG, "min_tokens": LONG})

    reader = threading.Thread(target=read)
    reader.start()
    server.wait_until(lambda: server.metrics()["kiln_requests_running"] == 1, 30, "running")
    start = time.perf_counter()
    assert server.stop(signal.SIGINT) == 0  # Ctrl-C
    assert time.perf_counter() - start < 10
    reader.join(10)
    response = result["response"]
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "abort"


def test_health_is_503_while_loading():
    from fastapi.testclient import TestClient

    from kiln.serve.app import build_app
    from kiln.serve.service import ModelService

    release = threading.Event()

    def load():
        release.wait(10)
        raise FileNotFoundError("no model here")

    service = ModelService(load, "m")
    with TestClient(build_app(service)) as http:
        loader = threading.Thread(target=lambda: pytest.raises(FileNotFoundError, service.load))
        loader.start()
        assert http.get("/health").status_code == 503
        response = http.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
        release.set()
        loader.join(10)
        assert http.get("/health").json() == {"status": "failed"}


def test_smollm2_server_matches_the_generator(default_model_cache, tmp_path):
    """The default model (no --model): chat and 16 concurrent completions give the texts
    kiln's Generator gives in-process for the same requests one by one."""
    import kiln

    server = start_server(tmp_path, "--cache-dir", str(default_model_cache), api_key=None)
    try:
        generator = kiln.Generator(cache_dir=default_model_cache, compute_type="auto")
        question = "What is the capital of France?"
        expected = generator.chat(question, max_length=24)
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = api.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24,
                                             messages=[{"role": "user", "content": question}],
                                             temperature=0)
        assert answer.choices[0].message.content == expected
        prompts = [f"Write one sentence about the number {i}." for i in range(16)]
        alone = [generator.generate(p, max_length=8 + i, include_prompt_in_result=False)
                 for i, p in enumerate(prompts)]

        async def together():
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                          max_retries=0) as async_api:
                return await asyncio.gather(*(async_api.completions.create(
                    model="SmolLM2-135M-Instruct", prompt=p, max_tokens=8 + i, temperature=0)
                    for i, p in enumerate(prompts)))

        assert [r.choices[0].text for r in asyncio.run(together())] == alone
        # Stop strings and non-ASCII text: streamed pieces are whole characters, never part
        # of a stop string, and join to the non-streamed text.
        request = dict(model="SmolLM2-135M-Instruct", max_tokens=48, temperature=0,
                       prompt="Écris une phrase en français sur le café. Réponse :", stop=["."])
        whole = api.completions.create(**request).choices[0]
        pieces = [c.choices[0].text for c in api.completions.create(stream=True, **request)
                  if c.choices]
        assert "".join(pieces) == whole.text and "." not in whole.text
        assert not any("\ufffd" in piece for piece in pieces)
        assert any(ord(ch) > 127 for ch in whole.text) or whole.finish_reason == "stop"
    finally:
        assert server.stop() == 0
