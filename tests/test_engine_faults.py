"""Faults, injected: a step that raises fails only its requests; a loop that dies fails every
waiting and later call with EngineDeadError within a second (and the server's /health says
503, Ray's health check fails the replica); a consumer or callback that raises is logged."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

import kiln
from kiln.errors import EngineDeadError

from .conftest import random_prompt, save_hf_model, tiny_gpt_neox

VOCAB = 90


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    source = save_hf_model(tiny_gpt_neox(seed=43, max_position_embeddings=512), root / "hf",
                           tokenizer_vocab=VOCAB)
    return kiln.convert(source, root / "float32")


def tokens_of(engine, prompt, **options):
    return engine.result(engine.add_request(prompt, **options)).result.tokens


OPTIONS = dict(end_token=[], include_prompt_in_result=False)


def test_a_failing_step_fails_only_its_requests_and_the_engine_goes_on(folder, monkeypatch,
                                                                       caplog):
    engine = kiln.Engine(folder, max_batch_size=2)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (3, 5, 7)]
    expected = [tokens_of(engine, p, max_length=40, **OPTIONS) for p in prompts]
    original, failed_step = engine.runner.execute, []

    def explode_once(plan):
        if plan.decode and not failed_step:
            failed_step.extend(s.id for s in plan.sequences)
            raise RuntimeError("kernel exploded")
        return original(plan)

    monkeypatch.setattr(engine.runner, "execute", explode_once)
    caplog.set_level(logging.ERROR, logger="kiln.engine")
    ids = [engine.add_request(p, max_length=40, **OPTIONS) for p in prompts]  # 2 slots: 1 waits
    outcomes = {}
    for request_id, want in zip(ids, expected, strict=True):
        try:
            outcomes[request_id] = engine.result(request_id).result.tokens == want
        except RuntimeError as error:
            assert "kernel exploded" in str(error)
            outcomes[request_id] = "failed"
    assert failed_step and {i for i, o in outcomes.items() if o == "failed"} == set(failed_step)
    assert all(outcomes[i] is True for i in ids if i not in failed_step)  # the rest unharmed
    record = next(r for r in caplog.records if "a step failed" in r.getMessage())
    assert all(str(i) in record.getMessage() for i in failed_step) and record.exc_info
    assert engine.alive and tokens_of(engine, prompts[0], max_length=40, **OPTIONS) == expected[0]


def test_a_failing_search_fails_only_its_request(folder, monkeypatch):
    engine = kiln.Engine(folder, max_batch_size=4)
    from kiln.generation import processors

    original = processors.Processors.apply

    def broken(self, logits, histories):
        if self.repetition_penalty == 1.7:
            raise ValueError("a processor broke")
        return original(self, logits, histories)

    monkeypatch.setattr(processors.Processors, "apply", broken)
    bad = engine.add_request([5, 6, 7], max_length=10, repetition_penalty=1.7, **OPTIONS)
    good = engine.add_request([5, 6, 7], max_length=10, repetition_penalty=1.2, **OPTIONS)
    with pytest.raises(ValueError, match="a processor broke"):
        engine.result(bad)
    assert len(engine.result(good).result.tokens) == 10


def test_a_dead_loop_fails_every_waiting_and_later_call_within_a_second(folder, monkeypatch):
    engine = kiln.Engine(folder, max_batch_size=2)
    running = [engine.add_request([5, 6], max_length=400, **OPTIONS) for _ in range(3)]
    stream = engine.stream(running[0])
    next(stream)
    errors, started = [], threading.Event()

    def waiter(request_id):
        started.set()
        try:
            engine.result(request_id)
        except EngineDeadError as error:
            errors.append((time.perf_counter(), error))

    threads = [threading.Thread(target=waiter, args=(i,)) for i in running[1:]]
    for thread in threads:
        thread.start()
    started.wait()

    def broken(*args, **kwargs):  # the bookkeeping itself fails: nothing to contain
        raise KeyError("slot table corrupted")

    monkeypatch.setattr(engine.scheduler, "release", broken)
    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    killed = time.perf_counter()
    with pytest.raises(EngineDeadError, match="slot table corrupted"):
        for _ in stream:
            pass
    for thread in threads:
        thread.join(5)
    assert len(errors) == 2 and all(at - killed < 1.0 for at, _ in errors)
    assert not engine.alive
    with pytest.raises(EngineDeadError):
        engine.add_request([5, 6], max_length=4)
    with pytest.raises(EngineDeadError):
        engine.wait(running)


def test_waiters_notice_a_dead_loop_even_if_failing_its_requests_fails(folder, monkeypatch):
    engine = kiln.Engine(folder, max_batch_size=2)
    request_id = engine.add_request([5, 6], max_length=400, **OPTIONS)
    next(iter(engine.stream(request_id)))

    def broken(*args, **kwargs):
        raise KeyError("corrupted")

    monkeypatch.setattr(engine._registry, "end", broken)  # failing the requests fails too
    monkeypatch.setattr(engine.scheduler, "schedule", broken)
    begin = time.perf_counter()
    with pytest.raises(EngineDeadError, match="corrupted"):
        engine.result(request_id)
    assert time.perf_counter() - begin < 1.0


def test_async_streams_get_engine_dead_error(folder, monkeypatch):
    engine = kiln.AsyncEngine(folder, max_batch_size=2)

    async def main():
        request_id = engine.add_request([5, 6], max_length=400, **OPTIONS)
        async for event in engine.stream(request_id):
            if event.index == 2:
                monkeypatch.setattr(engine.engine.scheduler, "schedule",
                                    lambda: (_ for _ in ()).throw(KeyError("corrupted")))

    with pytest.raises(EngineDeadError):
        asyncio.run(asyncio.wait_for(main(), 5))
    assert not engine.alive


def test_a_consumer_that_raises_is_logged_and_its_request_aborted(folder, caplog):
    engine = kiln.Engine(folder, max_batch_size=2)
    caplog.set_level(logging.ERROR, logger="kiln.engine")
    seen = []

    def sink(event):
        seen.append(event)
        if len(seen) == 3:
            raise RuntimeError("consumer gone")

    request_id = engine.add_request([5, 6], max_length=300, sink=sink, **OPTIONS)
    output = engine.result(request_id)
    assert output.finish_reason == "abort" and len(output.result.tokens) < 300
    assert any(f"request {request_id}" in r.getMessage() and r.exc_info for r in caplog.records)
    assert len(tokens_of(engine, [5, 6], max_length=5, **OPTIONS)) == 5  # the engine goes on


def test_a_generate_batch_callback_that_raises_reaches_the_caller(folder):
    generator = kiln.Generator(folder, max_batch_size=2)

    def callback(step):
        if step.step == 2:
            raise RuntimeError("callback failed")
        return False

    with pytest.raises(RuntimeError, match="callback failed"):
        generator.generate_batch([[5, 6, 7]], max_length=20, callback=callback, **OPTIONS)
    # the call's requests were aborted: the engine goes on and their slots are free
    assert len(generator.generate_batch([[5, 6]], max_length=4, **OPTIONS)[0]
               .sequences_ids[0]) == 4


def test_health_is_503_and_ray_check_fails_when_the_engine_died(folder, monkeypatch):
    from starlette.testclient import TestClient

    from kiln.serve.app import build_app
    from kiln.serve.ray import KilnReplica
    from kiln.serve.service import ModelService

    engine = kiln.AsyncEngine(folder, max_batch_size=2)
    service = ModelService(lambda: engine, "tiny")
    service.load()
    client = TestClient(build_app(service))
    assert client.get("/health").status_code == 200
    replica = KilnReplica.__new__(KilnReplica)
    replica.service = service
    replica.check_health()  # healthy: no error
    monkeypatch.setattr(engine.engine.scheduler, "schedule",
                        lambda: (_ for _ in ()).throw(KeyError("corrupted")))
    engine.engine.add_request([5, 6], max_length=4)
    deadline = time.time() + 5
    while engine.alive and time.time() < deadline:
        time.sleep(0.01)
    response = client.get("/health")
    assert response.status_code == 503 and response.json() == {"status": "engine dead"}
    with pytest.raises(RuntimeError, match="engine dead"):
        replica.check_health()
    answer = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6],
                                                  "max_tokens": 3})
    assert answer.status_code == 503
