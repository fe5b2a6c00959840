"""The Translator's engine: calls from several threads are decoded together (one decoder pass
per step over every live row, requests joining between steps), and each sentence gets what
it gets alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import kiln

from .conftest import word_level_tokenizer
from .test_translator import EOS, VOCAB, as_tokens, sources, tiny_seq2seq


@pytest.fixture(scope="module", params=["bart", "t5", "m2m_100"])
def translator(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.replace("_", ""))
    tiny_seq2seq(request.param).save_pretrained(folder)
    word_level_tokenizer(VOCAB, folder, bos=0, eos=EOS)
    return kiln.Translator(folder, compute_type="float32")


def _requests(seed: int) -> list[tuple[list[list[str]], dict]]:
    """Calls of different shapes: greedy, beams, a prefix, sampling, different lengths."""
    batch = [as_tokens(s) for s in sources(seed)]
    return [
        (batch[:2], dict(beam_size=1, max_decoding_length=20)),
        (batch[2:], dict(beam_size=3, max_decoding_length=12, num_hypotheses=2)),
        ([batch[1]], dict(beam_size=2, target_prefix=[["t7", "t8"]], max_decoding_length=9)),
        (batch, dict(beam_size=1, sampling_topk=10, sampling_temperature=0.9, seed=3,
                     max_decoding_length=15)),
        ([batch[3]], dict(beam_size=1, max_decoding_length=40, min_decoding_length=40)),
        ([batch[0]], dict(beam_size=4, max_decoding_length=6, return_attention=True)),
    ]


def test_concurrent_calls_get_what_they_get_alone(translator):
    calls = _requests(11) + _requests(12)
    options = [dict(o, return_scores=True) for _, o in calls]
    alone = [translator.translate_batch(s, **o) for (s, _), o in zip(calls, options, strict=True)]
    before = translator.engine.shared_steps
    together: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        together[index] = translator.translate_batch(calls[index][0], **options[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert translator.engine.shared_steps > before  # the calls shared decoder passes
    for mine, reference in zip(together, alone, strict=True):
        for one, other in zip(mine, reference, strict=True):
            assert one.hypotheses == other.hypotheses
            assert np.allclose(one.scores, other.scores, atol=1e-4)
            for a, b in zip(one.attention, other.attention, strict=True):
                assert np.allclose(np.array(a), np.array(b), atol=1e-5)


def test_a_short_call_does_not_wait_for_a_long_one(translator):
    """Continuous batching: a call that arrives while a long one decodes joins it between
    steps and returns long before it."""
    long_source = [as_tokens(sources(13)[3])]
    finished: dict[str, float] = {}

    def long_call() -> None:
        translator.translate_batch(long_source, beam_size=1, max_decoding_length=60,
                                   min_decoding_length=60)
        finished["long"] = time.perf_counter()

    thread = threading.Thread(target=long_call)
    steps = translator.engine.steps
    thread.start()
    while translator.engine.steps < steps + 3:  # the long one is decoding
        time.sleep(0.001)
    short = translator.translate_batch([as_tokens(sources(13)[0])], beam_size=1,
                                       max_decoding_length=3)
    finished["short"] = time.perf_counter()
    thread.join(60)
    assert short[0].hypotheses and finished["short"] < finished["long"]


def test_a_failing_step_reaches_its_callers_and_the_engine_goes_on(translator, monkeypatch):
    batch = [as_tokens(s) for s in sources(14)]
    expected = translator.translate_batch(batch, beam_size=2, max_decoding_length=8)
    original = translator.model.decode
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(translator.model, "decode", failing)
    with pytest.raises(RuntimeError, match="injected"):
        translator.translate_batch(batch, beam_size=2, max_decoding_length=8)
    again = translator.translate_batch(batch, beam_size=2, max_decoding_length=8)
    assert [r.hypotheses for r in again] == [r.hypotheses for r in expected]


def test_the_idle_thread_ends_and_comes_back(translator, monkeypatch):
    from kiln import translation_engine

    monkeypatch.setattr(translation_engine, "IDLE_SECONDS", 0.05)
    batch = [as_tokens(sources(15)[0])]
    first = translator.translate_batch(batch, beam_size=1, max_decoding_length=5)
    deadline = time.perf_counter() + 10
    while translator.engine._thread is not None and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert translator.engine._thread is None
    assert translator.translate_batch(batch, beam_size=1, max_decoding_length=5)[0].hypotheses \
        == first[0].hypotheses


def test_asynchronous_futures_are_decoded_together(translator):
    batch = [as_tokens(s) for s in sources(16)]
    expected = translator.translate_batch(batch, beam_size=1, max_decoding_length=12)
    before = translator.engine.shared_steps
    futures = translator.translate_batch(batch, beam_size=1, max_decoding_length=12,
                                         asynchronous=True)
    assert [f.result().hypotheses for f in futures] == [r.hypotheses for r in expected]
    assert translator.engine.shared_steps > before  # the futures shared decoder passes
