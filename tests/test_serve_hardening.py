"""`kiln serve` as careless clients and attackers meet it: each request that once got a 500
(or held the server) is a regression test here, against a real server process; the limits,
timeouts, CORS, Host and Content-Type rules; request ids, the access log and metrics."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from .conftest import save_hf_model, tiny_gpt_neox
from .serving import API_KEY, start_server

VOCAB = 90
LONG = 3000  # tokens a long request generates (end tokens barred): seconds of work
CHAT_TEMPLATE = ("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}"
                 "{% if add_generation_prompt %}t5{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    path = save_hf_model(tiny_gpt_neox(max_position_embeddings=4096), root / "hf",
                         tokenizer_vocab=VOCAB)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def launch(folder, tmp_path_factory, *flags: str, api_key: str | None = API_KEY):
    logs = tmp_path_factory.mktemp("hardening-logs")
    return start_server(logs, "--model", str(folder), "--compute-type", "float32",
                        "--cache-dir", str(folder.parent / "cache"), "--served-model-name",
                        "tiny", "--log-level", "info", *flags, api_key=api_key)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    running = launch(folder, tmp_path_factory, "--max-batch-size", "4", "--max-queue", "16",
                     "--max-queue-per-client", "16")
    yield running
    assert running.stop() == 0


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def assert_refused(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = error_of(response)
    for word in words:
        assert word in error["message"], error
    assert response.headers.get("x-request-id")
    return error


# ------------------------------------------------------------ inputs that once got a 500


@pytest.mark.parametrize("prompt", ["", [""], ["t5", ""], [[]], []])
def test_empty_prompts_are_400(server, prompt):
    response = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert_refused(response, 400, "empty")


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", '{"prompt": "t5 \\ud800 t6", "max_tokens": 2}'),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "t5 \\udfff"}]}'),
    ("/v1/completions", '{"prompt": "t5", "max_tokens": 2, "stop": ["\\ud800"]}'),
])
def test_lone_surrogates_are_400(server, path, body):
    assert_refused(server.post(path, body), 400, "surrogate")


def test_a_valid_surrogate_pair_is_served(server):
    response = server.post("/v1/completions", '{"prompt": "t5 \\ud83d\\ude00", "max_tokens": 2}')
    assert response.status_code == 200, response.text


def test_an_integer_of_5000_digits_is_400(server):
    body = '{"prompt": "t5", "max_tokens": ' + "9" * 5000 + "}"
    assert_refused(server.post("/v1/completions", body), 400, "too many digits")


def test_json_nested_100000_deep_is_400(server):
    body = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_refused(server.post("/v1/completions", body), 400, "nested")


def test_a_non_ascii_authorization_header_is_401(server):
    response = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "t5"}',
                          headers={"Content-Type": "application/json",
                                   "Authorization": "Bearer clé".encode("latin-1")})
    assert_refused(response, 401, "API key")


def test_tiny_temperature_is_greedy(server):
    body = {"prompt": "t7 t8 t9", "max_tokens": 12, "min_tokens": 12}
    greedy = server.post("/v1/completions", {**body, "temperature": 0}).json()
    tiny = server.post("/v1/completions", {**body, "temperature": 1e-40, "seed": 5}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_non_finite_logprobs_are_reported_as_openai_does():
    from kiln.generation.events import TokenEvent
    from kiln.serve.responses import Logprobs

    for chat in (False, True):
        logprobs = Logprobs(chat, 2, lambda token: f"t{token}")
        logprobs.add(TokenEvent(0, 5, "t5", float("-inf"),
                                top_log_probs=[(5, float("nan")), (6, float("-inf"))]))
        text = json.dumps(logprobs.body(), allow_nan=False)  # raises on NaN or Infinity
        assert "-9999.0" in text


# ------------------------------------------------------------ limits


def test_a_body_over_the_limit_is_413_from_its_content_length(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        start = time.perf_counter()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 60000000\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n")
        sock.sendall(b'{"prompt": "' + b"t5 " * 1000)
        reply = b""
        while b"}}" not in reply:  # the whole error body
            piece = sock.recv(4096)
            if not piece:
                break
            reply += piece
        elapsed = time.perf_counter() - start
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert b"--max-body-size" in reply
    print(f"60 MB body refused in {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0


def test_a_chunked_body_over_the_limit_is_refused_once_the_limit_is_read(server):
    sent = 0

    def chunks():
        nonlocal sent
        yield b'{"prompt": "'
        for _ in range(60):  # 60 MB unless refused on the way
            sent += 1 << 20
            yield b"t5 " * ((1 << 20) // 3)

    start = time.perf_counter()
    try:
        response = httpx.post(server.url + "/v1/completions", content=chunks(),
                              headers={"Content-Type": "application/json", **server.headers},
                              timeout=30)
        assert_refused(response, 413, "--max-body-size")
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass  # refused while still sending: the server closed the connection
    assert time.perf_counter() - start < 5
    assert sent < 30 << 20  # the server stopped reading long before 60 MB


def test_a_huge_body_does_not_stall_a_running_stream(server):
    """While a 60 MB body is refused, a stream's tokens keep coming at their pace."""
    stamps: list[float] = []

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          headers={"Content-Type": "application/json", **server.headers},
                          json={"prompt": "t9", "max_tokens": 400, "min_tokens": 400,
                                "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())

    reader = threading.Thread(target=stream)
    reader.start()
    server.wait_until(lambda: len(stamps) > 100, timeout=30, what="100 streamed tokens")
    upload_start = time.perf_counter()
    for _ in range(3):
        test_a_body_over_the_limit_is_413_from_its_content_length(server)
    upload_end = time.perf_counter()
    reader.join()
    pairs = list(zip(stamps, stamps[1:], strict=False))
    before = [b - a for a, b in pairs if b < upload_start]
    during = [b - a for a, b in pairs if upload_start <= a <= upload_end + 0.05]
    assert len(pairs) >= 399
    print(f"ITL median {statistics.median(before) * 1000:.2f} ms before, "
          f"{statistics.median(during or [0]) * 1000:.2f} ms during ({len(during)} gaps)")
    if during:
        assert statistics.median(during) <= 2 * statistics.median(before) + 0.005


def test_too_many_choices_are_400(server):
    response = server.post("/v1/completions", {"prompt": ["t5"] * 4, "n": 16, "max_tokens": 1})
    assert_refused(response, 400, "--max-choices")


def test_a_prompt_over_the_character_limit_is_400(folder, tmp_path_factory):
    small = launch(folder, tmp_path_factory, "--max-prompt-chars", "100")
    try:
        response = small.post("/v1/completions", {"prompt": "t5 " * 40, "max_tokens": 1})
        assert_refused(response, 400, "--max-prompt-chars")
        response = small.post("/v1/chat/completions",
                              {"messages": [{"role": "user", "content": "t5 " * 40}]})
        assert_refused(response, 400, "--max-prompt-chars")
        assert small.post("/v1/completions", {"prompt": "t5 " * 30, "max_tokens": 1}
                          ).status_code == 200
    finally:
        assert small.stop() == 0


@pytest.mark.parametrize("stop,words", [(["x" * 300], ["--max-stop-chars"]),
                                        (["a", "b", "c", "d", "e"], ["at most 4"])])
def test_stop_strings_are_bounded(server, stop, words):
    response = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 1, "stop": stop})
    assert_refused(response, 400, *words)


# ------------------------------------------------------------ the request's form


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_declared_json_is_415(server, content_type):
    headers = {**server.headers}
    if content_type:
        headers["Content-Type"] = content_type
    response = httpx.post(server.url + "/v1/completions", headers=headers,
                          content=b'{"prompt": "t5", "max_tokens": 1}')
    assert_refused(response, 415, "application/json")


def test_json_with_a_charset_is_accepted(server):
    response = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 1},
                           headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field,value", [("functions", [{"name": "f"}]), ("guided_json", {}),
                                         ("ignore_eos", True), ("logit_bias_extra", 1)])
def test_unknown_fields_that_would_change_the_output_are_400(server, field, value):
    response = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 1, field: value})
    error = assert_refused(response, 400, field)
    assert error["param"] == field


def test_fields_accepted_and_ignored_on_purpose(server):
    extra = {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto"}
    response = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "t5"}], "max_tokens": 1, **extra})
    assert response.status_code == 200, response.text


def test_an_unknown_message_field_is_400(server):
    response = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "t5", "audio": {"id": "x"}}], "max_tokens": 1})
    assert_refused(response, 400, "audio")


def test_the_model_by_id(server):
    response = httpx.get(server.url + "/v1/models/tiny", headers=server.headers)
    assert response.status_code == 200 and response.json()["id"] == "tiny"
    response = httpx.get(server.url + "/v1/models/other", headers=server.headers)
    assert assert_refused(response, 404, "other")["code"] == "model_not_found"


def test_an_unknown_route_is_an_openai_shaped_404(server):
    assert_refused(httpx.get(server.url + "/v2/nothing"), 404)


# ------------------------------------------------------------ origins and hosts


def test_no_cross_origin_access_by_default(server):
    preflight = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 1},
                           headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers


def test_allowed_origins_and_hosts(folder, tmp_path_factory):
    strict = launch(folder, tmp_path_factory, "--allowed-origins", "http://app.example",
                    "--allowed-hosts", "127.0.0.1", "localhost")
    try:
        preflight = httpx.options(strict.url + "/v1/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(strict.url + "/v1/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
        response = strict.post("/v1/completions", {"prompt": "t5", "max_tokens": 1},
                               headers={"Host": "evil.example"})
        assert_refused(response, 400, "evil.example", "--allowed-hosts")
        assert strict.post("/v1/completions", {"prompt": "t5", "max_tokens": 1}
                           ).status_code == 200
    finally:
        assert strict.stop() == 0


# ------------------------------------------------------------ time limits and fairness


def long_body(**extra) -> dict:
    return {"prompt": "t9", "max_tokens": LONG, "min_tokens": LONG, **extra}


def test_queue_timeout_and_fairness(folder, tmp_path_factory):
    """One slot: a long request holds it; the next wait. Past --queue-timeout they get 503
    with Retry-After. A client may fill only its share of the queue (429); another client
    address still gets in."""
    busy = launch(folder, tmp_path_factory, "--max-batch-size", "1", "--max-queue", "4",
                  "--max-queue-per-client", "2", "--queue-timeout", "1.5")
    try:
        holder = threading.Thread(target=lambda: busy.post("/v1/completions", long_body()))
        holder.start()
        busy.wait_until(lambda: busy.metrics().get("kiln_slots_in_use", 0) == 1, 10, "a slot")
        results: list[httpx.Response] = []
        waiters = [threading.Thread(target=lambda: results.append(
            busy.post("/v1/completions", {"prompt": "t5", "max_tokens": 2}))) for _ in range(2)]
        for waiter in waiters:
            waiter.start()
        busy.wait_until(lambda: busy.metrics().get("kiln_requests_waiting", 0) == 2, 10,
                        "two waiting")
        # A third request from the same address exceeds its share of the queue ...
        assert_refused(busy.post("/v1/completions", {"prompt": "t5", "max_tokens": 2}), 429,
                       "--max-queue-per-client")
        # ... while another address is still admitted (it, too, times out in the queue).
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        start = time.perf_counter()
        response = other.post(busy.url + "/v1/completions",
                              json={"prompt": "t5", "stream": True},
                              headers=busy.headers, timeout=30)
        waited = time.perf_counter() - start
        error = assert_refused(response, 503, "--queue-timeout")  # a stream too: no 200 first
        assert error["code"] == "queue_timeout"
        assert response.headers["retry-after"]
        assert 1.0 < waited < 4.0
        for waiter in waiters:
            waiter.join()
        assert [r.status_code for r in results] == [503, 503]
        holder.join()
        metrics = busy.metrics()
        assert metrics['kiln_requests_rejected_total{reason="queue_timeout"}'] == 3
        assert metrics['kiln_requests_rejected_total{reason="client_queue_full"}'] == 1
        assert metrics["kiln_queue_wait_seconds_count"] >= 1
        busy.wait_until(lambda: busy.metrics()["kiln_slots_in_use"] == 0, 10, "slots free")
        assert busy.post("/v1/completions", {"prompt": "t5", "max_tokens": 2}).status_code == 200
    finally:
        assert busy.stop() == 0


def test_request_timeout(folder, tmp_path_factory):
    """A running request is cut at --request-timeout with finish_reason "length", its text
    kept (streamed or not)."""
    busy = launch(folder, tmp_path_factory, "--max-batch-size", "1", "--request-timeout", "0.5")
    try:
        start = time.perf_counter()
        response = busy.post("/v1/completions", long_body())
        took = time.perf_counter() - start
        body = response.json()
        assert response.status_code == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
        assert 0 < body["usage"]["completion_tokens"] < LONG
        assert len(body["choices"][0]["text"].split()) == body["usage"]["completion_tokens"]
        assert 0.4 < took < 3
        streamed = []
        with httpx.stream("POST", busy.url + "/v1/completions", headers=busy.headers,
                          json=long_body(stream=True), timeout=30) as events:
            for line in events.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(json.loads(line[6:]))
        assert streamed[-1]["choices"][0]["finish_reason"] == "length"
        assert 1 < len(streamed) < LONG
        busy.wait_until(lambda: busy.metrics()["kiln_slots_in_use"] == 0, 10, "slots free")
    finally:
        assert busy.stop() == 0


def test_no_token_before_the_deadline_is_504_and_a_long_queue_wait_503():
    """In process, with an engine that never produces a token: past --request-timeout the
    request is answered 504 (nothing was sent yet), past --queue-timeout while still queued
    503 with Retry-After; either way its engine requests are aborted."""
    import asyncio

    from kiln.serve.limits import ServeLimits
    from kiln.serve.service import Admitted, APIError, Choice, ModelService

    class SilentEngine:
        def __init__(self, waiting: bool) -> None:
            self.waiting, self.aborted = waiting, []

        async def stream(self, request_id):
            try:
                await asyncio.sleep(3600)
                yield None
            finally:
                self.aborted.append(request_id)

        def is_waiting(self, request_id) -> bool:
            return self.waiting

        def stats(self):
            return None

    async def answer(limits: ServeLimits, engine: SilentEngine) -> APIError:
        service = ModelService(lambda: None, "tiny", limits=limits)
        service.engine = engine
        admitted = Admitted([Choice(0, 7, 3, time.perf_counter())], None)
        admitted.arrived = time.perf_counter()
        events = service.timed_events(admitted)
        start = time.perf_counter()
        with pytest.raises(APIError) as raised:
            await events.__anext__()
        await events.aclose()
        raised.value.elapsed = time.perf_counter() - start
        return raised.value

    running = SilentEngine(waiting=False)  # it has a slot, but no token comes
    error = asyncio.run(answer(ServeLimits(request_timeout=0.3, queue_timeout=5), running))
    assert error.status == 504 and error.code == "request_timeout"
    assert "--request-timeout" in error.message and 0.25 < error.elapsed < 1.0
    assert running.aborted == [7]
    queued = SilentEngine(waiting=True)
    error = asyncio.run(answer(ServeLimits(request_timeout=5, queue_timeout=0.3), queued))
    assert error.status == 503 and error.code == "queue_timeout"
    assert error.headers["Retry-After"] and queued.aborted == [7]


def test_a_client_that_stops_reading_loses_its_slot(folder, tmp_path_factory):
    slow = launch(folder, tmp_path_factory, "--send-timeout", "1")
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", slow.port))
        # 16 streams of 3000 tokens with 5 alternatives each: far more than socket buffers hold
        body = json.dumps(long_body(stream=True, logprobs=5, n=16)).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer "
                     + API_KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        slow.wait_until(lambda: slow.metrics().get("kiln_slots_in_use", 0) > 0, 10, "a slot")
        # Never read: the socket buffers fill, the server's send waits, then gives up.
        slow.wait_until(lambda: slow.metrics()["kiln_slots_in_use"] == 0, 60,
                        "the slot freed after the send timeout")
        generated = slow.metrics()["kiln_generation_tokens_total"]
        assert generated < 16 * LONG
        sock.close()
        assert "--send-timeout" in slow.log.read_text()
    finally:
        assert slow.stop() == 0


# ------------------------------------------------------------ observability


def test_request_ids_and_the_access_log(server):
    response = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 3},
                           headers={"X-Request-Id": "my-id-123"})
    assert response.headers["x-request-id"] == "my-id-123"
    made = server.post("/v1/completions", {"prompt": "t5", "max_tokens": 3},
                       headers={"X-Request-Id": "bad id\twith tabs"})
    assert made.headers["x-request-id"] != "bad id\twith tabs"
    assert len(made.headers["x-request-id"]) == 32
    assert httpx.get(server.url + "/health").headers["x-request-id"]
    def logged() -> str | None:  # the whole line (a line may be read while it is written)
        return next((line for line in server.log.read_text().splitlines()
                     if "request_id=my-id-123" in line and "path=" in line), None)

    server.wait_until(lambda: logged() is not None, 10, "access log")
    line = logged()
    for part in ("status=200", "prompt_tokens=1", "completion_tokens=3", "ttft_ms=",
                 "path=/v1/completions"):
        assert part in line, line


def test_json_logs(folder, tmp_path_factory):
    logged = launch(folder, tmp_path_factory, "--log-format", "json")
    try:
        logged.post("/v1/completions", {"prompt": "t5", "max_tokens": 2},
                    headers={"X-Request-Id": "json-1"})
        logged.post("/v1/completions", "not json", headers={"X-Request-Id": "json-2"})
        logged.wait_until(lambda: "json-2" in logged.log.read_text(), 5, "access log")
    finally:
        assert logged.stop() == 0
    entries = [json.loads(line) for line in logged.log.read_text().splitlines()
               if line.startswith("{")]
    by_id = {entry.get("request_id"): entry for entry in entries}
    assert by_id["json-1"]["status"] == 200 and by_id["json-1"]["completion_tokens"] == 2
    assert by_id["json-2"]["status"] == 400
    lines = [line for line in logged.log.read_text().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines


def test_a_bug_answers_500_with_the_request_id_and_no_internals(caplog):
    """The Guard's last word, in process: an app that raises."""
    import asyncio

    from kiln.serve.guard import Guard
    from kiln.serve.limits import ServeLimits

    async def broken_app(scope, receive, send):
        raise RuntimeError("secret internal detail /home/model")

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"bug-1")]}
    asyncio.run(Guard(broken_app, ServeLimits(), lambda reason: None)(scope, receive, send))
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert "bug-1" in body["error"]["message"]
    assert "secret" not in sent[1]["body"].decode()
    assert any("bug-1" in record.getMessage() and record.exc_info for record in caplog.records)


@pytest.mark.parametrize("flags,flag", [(["--max-body-size", "0"], "--max-body-size"),
                                        (["--queue-timeout", "0"], "--queue-timeout"),
                                        (["--max-queue-per-client", "0"],
                                         "--max-queue-per-client"),
                                        (["--send-timeout", "-1"], "--send-timeout")])
def test_bad_limits_are_refused_before_loading(flags, flag):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kiln", "serve", "--model", "/nonexistent",
                           *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert flag in done.stderr, done.stderr
