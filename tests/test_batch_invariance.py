"""A request's tokens do not depend on its neighbours, on the real default model
(SmolLM2-135M-Instruct, int8 and float32): 16 ragged prompts, one of them long enough to be
prefilled in several chunks, give the same tokens alone, in one generate_batch, arriving at
random moments while the engine runs, and arriving at random steps of an engine stepped by
hand. Greedy rows and seeded sampled rows."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

import kiln

TEXTS = ["Hi", "The cat", "Once upon a time there", "Paris is", "def f(x):", "1, 2, 3,", "Why",
         "The quick brown fox", "In 1492,", "Water boils at", "My favourite",
         "import numpy as np\n", "Q: What is 2+2?\nA:", "The", "Dear Sir,"]
LONG = (Path(__file__).parent / "data" / "GPL-3").read_text(encoding="utf-8")[:1200]
BUDGET = 128  # prompt tokens per step: the long prompt takes several steps


@pytest.fixture(scope="module", params=["int8", "float32"])
def generator(request, default_model_cache):
    return kiln.Generator(cache_dir=default_model_cache, compute_type=request.param,
                          max_batch_size=16, max_prefill_tokens_per_step=BUDGET)


def requests_for(generator) -> list[tuple[list[int], dict]]:
    prompts = [generator.tokenizer.encode(text) for text in TEXTS + [LONG]]
    assert len(prompts[-1]) > 2 * BUDGET
    requests = []
    for index, prompt in enumerate(prompts):
        options = dict(max_length=24, end_token=[], include_prompt_in_result=False)
        if index % 4 == 1:
            options.update(sampling_topk=20, sampling_temperature=0.9, seed=index)
        requests.append((prompt, options))
    return requests


def alone(engine, prompt, options) -> list[int]:
    return [e.token_id for e in engine.stream(engine.add_request(prompt, **options))
            if e.token_id is not None]


def test_tokens_are_the_same_alone_batched_and_arriving_at_random(generator):
    engine = generator.engine
    requests = requests_for(generator)
    expected = [alone(engine, prompt, options) for prompt, options in requests]

    # one call holding all 16 (each row its own options)
    ids = [engine.add_request(prompt, **options) for prompt, options in requests]
    assert [output.result.tokens for output in engine.wait(ids)] == expected

    # arriving at random moments while the engine's thread runs, read by threads
    picker, results = random.Random(7), {}

    def consume(index, request_id):
        results[index] = [e.token_id for e in engine.stream(request_id)
                          if e.token_id is not None]

    threads = []
    for index in picker.sample(range(len(requests)), len(requests)):
        prompt, options = requests[index]
        threads.append(threading.Thread(target=consume,
                                        args=(index, engine.add_request(prompt, **options))))
        threads[-1].start()
        threading.Event().wait(picker.random() * 0.03)
    for thread in threads:
        thread.join()
    assert [results[index] for index in range(len(requests))] == expected

    # arriving at chosen steps of an engine stepped by hand (same model, same budget)
    manual = kiln.Engine(engine.loaded, threaded=False, max_batch_size=16,
                         max_prefill_tokens_per_step=BUDGET)
    pending, tokens, order = list(range(len(requests))), {}, {}
    picker.shuffle(pending)
    while pending or manual.has_work():
        for _ in range(picker.randint(0, 3)):
            if pending:
                index = pending.pop()
                request_id = manual.add_request(requests[index][0], **requests[index][1])
                order[request_id], tokens[request_id] = index, []
        for event in manual.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
    by_index = {order[request_id]: found for request_id, found in tokens.items()}
    assert [by_index[index] for index in range(len(requests))] == expected
