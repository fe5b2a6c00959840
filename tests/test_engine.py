"""The engine: continuous batching over the slot pool, tested as users meet it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import threading

import pytest
import torch

import kiln
from kiln.generation.engine import EngineStats, cpu_has_amx
from kiln.generation.slots import SlotPool, parse_memory

from .conftest import random_prompt, save_hf_model, settle, tiny_gpt_neox

VOCAB = 90


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    source = save_hf_model(tiny_gpt_neox(seed=41, max_position_embeddings=512), root / "hf",
                           tokenizer_vocab=VOCAB)
    return {"float32": kiln.convert(source, root / "float32"),
            "int8": kiln.convert(source, root / "int8", quantization="int8")}


def run_alone(engine, prompt, **options):
    request_id = engine.add_request(prompt, **options)
    return [event.token_id for event in engine.stream(request_id) if event.token_id is not None]


def ragged_requests(picker: random.Random) -> list[tuple[list[int], dict]]:
    requests = []
    for index in range(16):
        options = dict(max_length=picker.randint(3, 30), end_token=[],
                       include_prompt_in_result=False)
        if index % 3 == 1:
            options.update(sampling_topk=8, sampling_temperature=1.3, seed=100 + index)
        if index % 5 == 2:
            options.update(repetition_penalty=1.4)
        length = picker.randint(230, 300) if index % 4 == 3 else picker.randint(1, 60)
        requests.append((random_prompt(length, VOCAB, seed=index), options))
    return requests


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_requests_arriving_at_random_steps_give_what_each_gives_alone(folders, weights):
    """16 ragged requests with different lengths and options, added at random steps while
    others run (6 slots, small prefill budget: chunked prompts beside decode rows; some rows
    past 256 positions, so the step reads more attention columns than short rows need).
    Stepped by hand (a caller-driven engine), so the arrival steps are exactly these."""
    engine = kiln.Engine(folders[weights], max_batch_size=6, max_prefill_tokens_per_step=24,
                         threaded=False)
    picker = random.Random(5)
    requests = ragged_requests(picker)
    alone = [run_alone(engine, prompt, **options) for prompt, options in requests]

    tokens: dict[int, list[int]] = {}
    ids, pending = [], list(requests)
    widest = 0
    while pending or engine.has_work():
        for _ in range(picker.randint(0, 3)):
            if pending:
                prompt, options = pending.pop(0)
                request_id = engine.add_request(prompt, **options)
                ids.append(request_id)
                tokens[request_id] = []
        widest = max(widest, engine.stats().running)
        for event in engine.step():
            if event.token_id is not None:
                tokens[event.request_id].append(event.token_id)
    assert widest >= 4  # requests did share steps
    assert [tokens[request_id] for request_id in ids] == alone
    assert engine.stats().slots_used == 0


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_requests_arriving_while_the_engine_runs_give_what_each_gives_alone(folders, weights):
    """The same requests submitted at random moments to an engine stepping on its own thread
    (the default), consumed by threads of their own."""
    engine = kiln.Engine(folders[weights], max_batch_size=6, max_prefill_tokens_per_step=24)
    picker = random.Random(6)
    requests = ragged_requests(picker)
    alone = [run_alone(engine, prompt, **options) for prompt, options in requests]
    steps = []
    original = engine.runner.execute
    engine.runner.execute = lambda plan: steps.append(len(plan.sequences)) or original(plan)
    results: dict[int, list[int]] = {}

    def consume(index, request_id):
        results[index] = [e.token_id for e in engine.stream(request_id) if e.token_id is not None]

    threads = []
    for index, (prompt, options) in enumerate(requests):
        thread = threading.Thread(target=consume, args=(index, engine.add_request(prompt,
                                                                                  **options)))
        thread.start()
        threads.append(thread)
        threading.Event().wait(picker.random() * 0.01)
    for thread in threads:
        thread.join()
    assert [results[index] for index in range(16)] == alone
    assert max(steps) >= 3  # requests did share steps
    settle(engine)
    assert engine.stats().slots_used == 0


def test_seeded_sampling_is_the_same_alone_or_batched(folders):
    engine = kiln.Engine(folders["int8"], max_batch_size=8)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (3, 9, 14, 2)]
    options = [dict(max_length=12, sampling_topk=0, sampling_temperature=t, seed=s, end_token=[],
                    include_prompt_in_result=False)
               for t, s in ((1.0, 1), (1.5, 2), (0.7, 3), (2.0, 4))]
    alone = [run_alone(engine, p, **o) for p, o in zip(prompts, options, strict=True)]
    ids = [engine.add_request(p, **o) for p, o in zip(prompts, options, strict=True)]
    batched = [output.result.tokens for output in engine.wait(ids)]
    assert batched == alone
    assert len({tuple(tokens) for tokens in alone}) == 4


def test_a_long_prompt_does_not_stall_running_streams(folders):
    engine = kiln.Engine(folders["float32"], max_batch_size=4, max_prefill_tokens_per_step=16,
                         threaded=False)
    running = engine.add_request(random_prompt(4, VOCAB, seed=1), max_length=40, end_token=[],
                                 include_prompt_in_result=False)
    engine.step()  # its prompt and first token
    long_prompt = engine.add_request(random_prompt(200, VOCAB, seed=2), max_length=3,
                                     end_token=[], include_prompt_in_result=False)
    prefill_steps = 0
    while True:
        produced = {event.request_id for event in engine.step() if event.token_id is not None}
        assert running in produced  # a token every step while the long prompt prefills
        prefill_steps += 1
        if long_prompt in produced:
            break
    assert prefill_steps == 200 // 16 + 1  # 16 prompt tokens per step, at most


def test_requests_that_cannot_fit_are_refused_before_any_work(folders, monkeypatch):
    engine = kiln.Engine(folders["float32"], max_batch_size=2, max_length=64)
    calls = []
    monkeypatch.setattr(engine.runner, "prefill", lambda *a: calls.append(a))
    with pytest.raises(kiln.RequestError, match="engine's 64 positions per sequence"):
        engine.add_request([5] * 40, max_length=30, include_prompt_in_result=False)
    with pytest.raises(kiln.RequestError, match="context of 512"):
        engine.add_request([5] * 500, max_length=100, include_prompt_in_result=False)
    with pytest.raises(kiln.RequestError, match="beam_size=4 needs 4 cache slots"):
        engine.add_request([5, 6], max_length=8, beam_size=4)
    with pytest.raises(kiln.RequestError, match="unknown generation option"):
        engine.add_request([5, 6], max_lenght=8)
    assert not engine.has_work() and not calls


def test_abort_mid_stream_frees_the_slot_for_the_next_request_in_the_same_step(folders):
    engine = kiln.Engine(folders["float32"], max_batch_size=1, threaded=False)
    first = engine.add_request([5, 6, 7], max_length=50, end_token=[])
    stream = engine.stream(first)
    next(stream), next(stream)
    second = engine.add_request([8, 9], max_length=4, end_token=[],
                                include_prompt_in_result=False)
    engine.step()
    assert engine.stats().waiting == 1  # no free slot while the first runs
    stream.close()  # leaving the stream aborts the request; no step under way: freed at once
    assert engine.stats() == EngineStats(waiting=1, running=0, slots=1, slots_used=0)
    events = engine.step()
    assert any(e.request_id == second and e.token_id is not None for e in events)
    third = engine.add_request([5, 6], max_length=4, end_token=[])
    with engine._step_lock:  # an abort that arrives while a step runs
        engine.abort(second)
    events = engine.step()  # ...is applied first thing in the next step, which admits the third
    assert [e.finish_reason for e in events if e.request_id == second] == ["abort"]
    assert any(e.request_id == third and e.token_id is not None for e in events)
    assert len(engine.result(second).result.tokens) == 1


def test_a_stream_left_early_frees_its_slot_for_the_next_request(folders):
    engine = kiln.Engine(folders["float32"], max_batch_size=1)  # its own thread
    first = engine.add_request([5, 6, 7], max_length=200, end_token=[])
    stream = engine.stream(first)
    next(stream), next(stream)
    second = engine.add_request([8, 9], max_length=4, end_token=[],
                                include_prompt_in_result=False)
    assert engine.stats().waiting == 1  # no free slot while the first runs
    stream.close()  # leaving the stream aborts the request
    output = engine.result(second)  # ...and the second gets the slot
    assert output.finish_reason == kiln.FinishReason.LENGTH == "length"
    assert len(output.result.tokens) == 4
    first_output = engine._registry.finished.get(first)
    assert first_output is None or first_output.finish_reason == "abort"
    settle(engine)
    assert engine.stats() == EngineStats(waiting=0, running=0, slots=1, slots_used=0)


def test_abort_of_a_waiting_request_and_finish_reasons(folders):
    engine = kiln.Engine(folders["float32"], max_batch_size=1)
    busy = engine.add_request([5, 6], max_length=6, end_token=[])
    queued = engine.add_request([5, 6], max_length=6)
    engine.abort(queued)
    assert engine.result(queued).finish_reason == "abort"
    assert engine.result(busy).finish_reason == "length"
    free = run_alone(engine, [5, 6], max_length=12, end_token=[], include_prompt_in_result=False)
    end = free[4]
    ended = engine.add_request([5, 6], max_length=12, end_token=end, include_prompt_in_result=False)
    events = list(engine.stream(ended))
    assert events[-1].finish_reason == "stop"
    assert [e.token_id for e in events if e.token_id is not None] == free[:free.index(end)]


def test_200_requests_through_4_slots_hold_nothing_afterwards(folders):
    engine = kiln.Engine(folders["int8"], max_batch_size=4)
    prompts = [random_prompt(1 + i % 9, VOCAB, seed=i) for i in range(200)]

    def tensors():
        gc.collect()
        return sum(1 for item in gc.get_objects() if isinstance(item, torch.Tensor))

    before = None
    for start in range(0, 200, 25):
        if start == 25:  # after a first round: traced steps of every bucket, lazy tables
            before = tensors()
        ids = [engine.add_request(p, max_length=2 + i % 7, sampling_topk=5, seed=i,
                                  include_prompt_in_result=False)
               for i, p in enumerate(prompts[start:start + 25])]
        engine.wait(ids)
    settle(engine)
    assert engine.stats() == EngineStats(0, 0, 4, 0)
    registry = engine._registry
    assert not registry.live and not registry.finished and not engine.scheduler.running
    assert tensors() <= before


def test_a_crash_inside_a_step_fails_the_requests_in_flight_and_the_engine_goes_on(folders,
                                                                                    monkeypatch):
    engine = kiln.Engine(folders["float32"], max_batch_size=2, threaded=False)
    expected = run_alone(engine, [5, 6, 7], max_length=6, end_token=[])
    first = engine.add_request([5, 6, 7], max_length=6, end_token=[])
    second = engine.add_request([8, 9], max_length=6, end_token=[])
    waiting = engine.add_request([5, 6, 7], max_length=6, end_token=[])
    engine.step()
    original = engine.runner.decode

    def broken(rows):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.runner, "decode", broken)
    events = engine.step()
    assert {e.request_id for e in events if e.error is not None} == {first, second}
    assert {e.finish_reason for e in events if e.error is not None} == {"error"}
    with pytest.raises(RuntimeError, match="kernel exploded"):
        engine.result(first)
    monkeypatch.setattr(engine.runner, "decode", original)
    assert engine.result(waiting).result.tokens == expected  # admitted once slots were free
    assert engine.stats().slots_used == 0


def test_out_of_memory_in_a_step_says_what_to_lower(folders, monkeypatch):
    engine = kiln.Engine(folders["float32"], max_batch_size=2)

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(type(engine.loaded.model), "forward", exhausted)
    monkeypatch.setattr(type(engine.loaded.model), "prefill", exhausted)
    request_id = engine.add_request([5, 6], max_length=4)
    with pytest.raises(kiln.OutOfMemory, match="max_prefill_tokens_per_step or max_batch_size"):
        engine.result(request_id)
    monkeypatch.undo()
    assert len(run_alone(engine, [5, 6], max_length=4, end_token=[])) == 3


def test_threads_calling_generate_batch_run_batched(folders, monkeypatch):
    generator = kiln.Generator(folders["int8"], max_batch_size=8)
    requests = [[random_prompt(3 + i % 5, VOCAB, seed=200 + i)] for i in range(8)]

    def run(prompts):
        return generator.generate_batch(prompts, max_length=24, end_token=[],
                                        include_prompt_in_result=False)[0].sequences_ids

    sequential = [run(prompts) for prompts in requests]
    widths = []
    decode = generator.engine.runner.decode
    monkeypatch.setattr(generator.engine.runner, "decode",
                        lambda rows: widths.append(len(rows)) or decode(rows))
    barrier = threading.Barrier(8)
    results = [None] * 8

    def worker(index):
        barrier.wait()
        results[index] = run(requests[index])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == sequential
    assert max(widths) >= 6  # most of the 8 calls decoded in the same steps
    assert len(widths) < 8 * 23 / 2  # far fewer steps than calls taken in turn


def test_stop_strings_and_text_events(folders):
    engine = kiln.Engine(folders["float32"])
    prompt = [5, 6, 7]
    free = engine.result(engine.add_request(prompt, max_length=20, end_token=[], text=True,
                                            include_prompt_in_result=False)).text
    words = free.split(" ")
    stop = words[3][-1:] + " " + words[4][:2]
    request_id = engine.add_request(prompt, max_length=20, end_token=[], stop=[stop, "zzz"],
                                    include_prompt_in_result=False)
    events = list(engine.stream(request_id))
    text = "".join(event.text for event in events)
    assert text == free[: free.find(stop)]
    assert events[-1].finish_reason == "stop"
    for index in range(len(events)):  # no event ever gave out a piece of the stop string
        assert stop[:2] not in "".join(e.text for e in events[: index + 1])[len(text) - 1:]


def test_async_engine_streams_concurrently_and_a_client_leaving_aborts(folders):
    engine = kiln.AsyncEngine(folders["float32"], max_batch_size=3)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (2, 7, 11)]
    expected = [run_alone(engine.engine, p, max_length=10, end_token=[],
                          include_prompt_in_result=False) for p in prompts]

    async def collect(prompt, stop_after=None):
        request_id = engine.add_request(prompt, max_length=10, end_token=[],
                                        include_prompt_in_result=False)
        tokens = []
        async with contextlib.aclosing(engine.stream(request_id)) as events:
            async for event in events:  # leaving early closes the stream: the request aborts
                if event.token_id is not None:
                    tokens.append(event.token_id)
                if stop_after and len(tokens) == stop_after:
                    break
        return tokens

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts), collect(prompts[0], 2))

    try:
        *streamed, partial = asyncio.run(main())
        assert streamed == expected and partial == expected[0][:2]
        for _ in range(100):
            if engine.stats().slots_used == 0:
                break
            threading.Event().wait(0.01)
        assert engine.stats().slots_used == 0 and not engine.engine.has_work()
    finally:
        engine.shutdown()


def test_async_events_reach_the_event_loop_once_per_step_not_per_token(folders):
    engine = kiln.AsyncEngine(folders["float32"], max_batch_size=4)
    hops, steps = [], []
    original = engine.engine.runner.execute
    engine.engine.runner.execute = lambda plan: steps.append(1) or original(plan)

    async def main():
        loop = asyncio.get_running_loop()
        send = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: hops.append(1) or send(*args)
        ids = [engine.add_request(random_prompt(3 + i, VOCAB, seed=i), max_length=20,
                                  end_token=[], include_prompt_in_result=False)
               for i in range(4)]

        async def drain(request_id):
            return [e.token_id async for e in engine.stream(request_id) if e.token_id is not None]

        return await asyncio.gather(*(drain(request_id) for request_id in ids))

    try:
        streams = asyncio.run(main())
        assert [len(tokens) for tokens in streams] == [20] * 4
        assert len(hops) <= len(steps) < 4 * 20  # one hop per step carries every stream's token
    finally:
        engine.shutdown()


def test_async_engine_refuses_an_engine_stepped_by_its_callers(folders):
    with pytest.raises(ValueError, match="steps on its own thread"):
        kiln.AsyncEngine(kiln.Engine(folders["float32"], threaded=False))


def test_kv_cache_dtype_and_memory_budget(folders):
    int8 = kiln.Engine(folders["int8"])
    # bfloat16 attention pays off on CPUs with AMX only
    assert int8.kv_cache_dtype == (torch.bfloat16 if cpu_has_amx() else torch.float32)
    exact = kiln.Engine(folders["float32"])
    assert exact.kv_cache_dtype == torch.float32  # float32 stays exact
    spec = exact.spec
    per_slot = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * (256 + 1)  # whole buckets
    sized = kiln.Engine(folders["float32"], max_length=128, kv_cache_memory=per_slot * 5 + 10)
    assert sized.max_batch_size == 5 and sized.max_length == 128
    assert kiln.Engine(folders["float32"], kv_cache_memory="1MiB", max_batch_size=2,
                       max_length=128).max_batch_size == 2
    with pytest.raises(ValueError, match="less than one sequence"):
        kiln.Engine(folders["float32"], kv_cache_memory=1000)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        kiln.Engine(folders["float32"], kv_cache_dtype="int4")
    half = kiln.Engine(folders["float32"], kv_cache_dtype="bfloat16")
    tokens = run_alone(half, [5, 6, 7], max_length=8, end_token=[])
    assert len(tokens) == 6 and max(tokens) < VOCAB
    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("1.5 MB") == 1_500_000


def test_the_decode_step_is_captured_when_the_engine_starts(folders, monkeypatch):
    """On CPU one trace serves every batch size and attention length: made at start, it is
    all that any request needs (rows 1..6, 300 positions), so no stream waits for a capture."""
    from kiln.generation.static_step import StaticDecodeStep

    engine = kiln.Engine(folders["float32"], max_batch_size=6)
    static = engine.runner._static_step
    assert list(static._traces) == [False] and not static._steps
    built = []
    monkeypatch.setattr(StaticDecodeStep, "_build", lambda *a: built.append(a) or 1 / 0)
    engine.warm_up(300)
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (3, 280, 5, 7, 9, 11)]
    ids = [engine.add_request(p, max_length=300 - len(p) if len(p) > 200 else 8, end_token=[],
                              include_prompt_in_result=False) for p in prompts]
    engine.wait(ids)
    assert list(static._traces) == [False] and not built  # nothing new to capture


def test_slot_pool_hands_out_the_lowest_slots_and_stays_dense(folders):
    spec = kiln.Engine(folders["float32"], max_batch_size=1).spec
    pool = SlotPool(spec, 4, 16, torch.float32, torch.device("cpu"))
    assert pool.allocate(2) == [0, 1] and pool.allocate(1) == [2]
    assert pool.allocate(2) is None
    pool.cache.keys[0][2, :, :3] = 7.0
    pool.lengths[2] = 3
    pool.release([0])
    assert pool.compaction_moves() == [(2, 0)]
    assert pool.high == 2 and pool.lengths[0] == 3
    assert torch.all(pool.cache.keys[0][0, :, :3] == 7.0)
    with pytest.raises(kiln.KilnError, match="slot 3 is not in use"):
        pool.release([3])


def test_one_query_attention_is_exact_per_row_whatever_the_batch():
    """Decode attention gives a row the same bits alone or among 8 others (CPU SDPA's
    one-query path does not: ~1e-7 apart, enough to flip a near-tie), and equals SDPA."""
    from kiln.model.decoder import one_query_attention

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(9, 9, 1, 64, generator=generator)
    keys = torch.randn(9, 3, 512, 64, generator=generator)
    values = torch.randn(9, 3, 512, 64, generator=generator)
    positions = torch.arange(100, 109).view(9, 1, 1, 1)
    mask = torch.arange(512).view(1, 1, 1, -1) <= positions
    together = one_query_attention(q, keys, values, mask, 0.125)
    for row in range(9):
        alone = one_query_attention(q[row:row + 1], keys[row:row + 1], values[row:row + 1],
                                    mask[row:row + 1], 0.125)
        assert torch.equal(alone, together[row:row + 1])
    reference = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=0.125, enable_gqa=True)
    assert (together - reference).abs().max().item() < 1e-5


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux only")
def test_a_slot_costs_memory_for_what_it_holds_not_its_length():
    """The pool is sized for full-length sequences but must not be resident for them: a few
    positions written per slot keep the memory small. (numpy asks for transparent huge pages
    on large arrays; with them, one write made 2 MiB resident and every used slot cost its
    whole length.)"""
    from kiln.model.kv_cache import KVCache
    from kiln.model.spec import ModelSpec

    spec = ModelSpec(vocab_size=64, hidden_size=1024, num_layers=2, num_heads=16, num_kv_heads=16,
                     head_dim=64, intermediate_size=64, max_position_embeddings=4096,
                     rotary_dim=16)
    before = _resident_kib()
    cache = KVCache(spec, num_slots=8, max_length=4096, dtype=torch.float32, device="cpu")
    full_kib = sum(t.numel() * 4 for t in cache.keys + cache.values) // 1024  # 537 MB
    for tensor in cache.keys + cache.values:
        tensor[:, :, :32] = 1.0  # 32 positions of every slot and head
        tensor[:, :, cache.scratch_position] = 1.0  # and the padding column
    grown = _resident_kib() - before
    assert grown < full_kib / 10, f"{grown} KiB resident of {full_kib} KiB"
