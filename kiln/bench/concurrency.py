"""`kiln bench --concurrency N`: the engine and `kiln serve` under N simultaneous callers.

The worker (`python -m kiln.bench.concurrency`, a fresh process per run) loads the model
(the decode step is captured then) and, with N prompts of the same length each generating
exactly NEW tokens, greedy:
- first burst: right after loading, N threads each call `generate_batch` with one prompt;
- warm: one `generate_batch` holding all N; the N threads again; the N calls in turn;
- the engine's batch-N decode speed: the N requests submitted together, tokens/s from the
  step in which all of them have their first token to the last token;
- host time: the share of the steps' time spent outside the model (planning, sampling,
  events), over the warm one-call run;
- and the ragged workload of earlier versions (max_length 16-256, seeded): one by one vs
  together (aggregate tokens/s, time to first token, inter-token latency).

The harness runs each (model, engine, N) in `runs` fresh workers, then `kiln serve` on the
same folder under the same N prompts (serving.py), and reports the three targets: N threads
against one call, the server's tokens/s against the engine's batch-N decode speed, and the
server's TTFT at N against a lone request's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

MIN_NEW, MAX_NEW = 16, 256
FIXED_NEW = 64  # tokens per request in the threads / one-call / server comparisons


def workload(count: int, prompt_tokens: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) per request; the same seed gives the same requests."""
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(prompt_tokens)], rng.randint(MIN_NEW, MAX_NEW))
            for _ in range(count)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def latency_figures(starts: dict[int, float], arrivals: dict[int, list[float]], wall: float) -> dict:
    ttft = [arrivals[i][0] - starts[i] for i in arrivals]
    itl = [later - earlier for times in arrivals.values()
           for earlier, later in zip(times, times[1:], strict=False)]
    tokens = sum(len(times) for times in arrivals.values())
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "itl_p50_s": percentile(itl, 0.5), "itl_p99_s": percentile(itl, 0.99)}


def _submit(engine, prompt: list[int], new_tokens: int, sink=None) -> int:
    return engine.add_request(prompt, max_length=new_tokens, min_length=new_tokens,
                              include_prompt_in_result=False, sink=sink)


def run_together(engine, requests) -> dict:
    """Every request submitted at once; each token timed as the engine's thread hands it out."""
    starts, arrivals, ids = {}, {}, []
    begin = time.perf_counter()
    for index, (prompt, new_tokens) in enumerate(requests):
        times = arrivals[index] = []

        def timed(event, times=times):
            if event.token_id is not None:
                times.append(time.perf_counter())

        starts[index] = time.perf_counter()
        ids.append(_submit(engine, prompt, new_tokens, timed))
    engine.wait(ids)
    return latency_figures(starts, arrivals, time.perf_counter() - begin)


def run_one_by_one(engine, requests) -> dict:
    starts, arrivals = {}, {}
    begin = time.perf_counter()
    for prompt, new_tokens in requests:
        request_id = _submit(engine, prompt, new_tokens)
        starts[request_id], arrivals[request_id] = time.perf_counter(), []
        for event in engine.stream(request_id):
            if event.token_id is not None:
                arrivals[request_id].append(time.perf_counter())
    return latency_figures(starts, arrivals, time.perf_counter() - begin)


def fixed_prompts(count: int, prompt_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    return [prompt for prompt, _ in workload(count, prompt_tokens, vocab, seed)]


def _call(generator, prompts: list[list[int]], new_tokens: int) -> None:
    generator.generate_batch(prompts, max_length=new_tokens, min_length=new_tokens,
                             include_prompt_in_result=False)


def threads_burst(generator, prompts: list[list[int]], new_tokens: int) -> float:
    """N threads, released together, each calling generate_batch with one prompt: seconds."""
    import threading

    began: list[float] = []
    barrier = threading.Barrier(len(prompts), action=lambda: began.append(time.perf_counter()))

    def caller(prompt):
        barrier.wait()
        _call(generator, [prompt], new_tokens)

    workers = [threading.Thread(target=caller, args=(prompt,)) for prompt in prompts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began[0]


def timed(work) -> float:
    began = time.perf_counter()
    work()
    return time.perf_counter() - began


def decode_speed(engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of batch-N decoding: all N submitted at once, from the moment every request
    has its first token to the last token."""
    arrivals: list[list[float]] = []
    ids = []
    for prompt in prompts:
        times: list[float] = []
        arrivals.append(times)
        ids.append(_submit(engine, prompt, new_tokens,
                           lambda event, times=times: event.token_id is not None
                           and times.append(time.perf_counter())))
    engine.wait(ids)
    start = max(times[0] for times in arrivals)
    after = sum(sum(1 for t in times if t > start) for times in arrivals)
    return after / (max(times[-1] for times in arrivals) - start)


class _OlderTiming:
    """engine.timing for an engine that predates it: its steps and its runner's passes
    timed from outside (for comparisons with older trees, benchmarks/engine_targets.py)."""

    def __init__(self, engine) -> None:
        self.reset()
        runner = engine.runner
        for name in ("decode", "verify", "prefill"):
            setattr(runner, name, self._timed(getattr(runner, name), "forward_seconds"))
        engine.step = self._timed(engine.step, "seconds", count=True)

    def _timed(self, method, field: str, count: bool = False):
        def call(*args, **kwargs):
            began = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - began)
                self.steps += count
        return call

    def reset(self) -> None:
        self.steps, self.seconds, self.forward_seconds = 0, 0.0, 0.0

    @property
    def host_seconds(self) -> float:
        return self.seconds - self.forward_seconds

    @property
    def host_fraction(self) -> float:
        return self.host_seconds / self.seconds if self.seconds else 0.0


def measure(model: str, compute_type: str, concurrency: int, prompt_tokens: int, vocab: int,
            seed: int, threads: int, device: str, repeats: int = 3) -> dict:
    import torch

    import kiln

    torch.set_num_threads(threads)
    start = time.perf_counter()
    generator = kiln.Generator(model, device=device, compute_type=compute_type,
                               max_batch_size=max(concurrency, 1))
    engine = generator.engine
    load_s = time.perf_counter() - start
    if not hasattr(engine, "timing"):
        engine.timing = _OlderTiming(engine)
    prompts = fixed_prompts(concurrency, prompt_tokens, vocab, seed)
    tokens = concurrency * FIXED_NEW
    first_burst = threads_burst(generator, prompts, FIXED_NEW)  # nothing warmed up but the load
    one_call, burst, host = [], [], []
    for _ in range(repeats):  # alternated, so that drift hits both
        engine.timing.reset()
        one_call.append(timed(lambda: _call(generator, prompts, FIXED_NEW)))
        timing = engine.timing
        host.append((timing.host_fraction, 1000 * timing.host_seconds / timing.steps,
                     1000 * timing.seconds / timing.steps))
        burst.append(threads_burst(generator, prompts, FIXED_NEW))
    in_turn = timed(lambda: [_call(generator, [p], FIXED_NEW) for p in prompts])
    decode = statistics.median(decode_speed(engine, prompts, FIXED_NEW) for _ in range(repeats))
    host_fraction, host_ms, step_ms = sorted(host)[len(host) // 2]
    requests = workload(concurrency, prompt_tokens, vocab, seed)
    one_by_one = run_one_by_one(engine, requests)
    together = run_together(engine, requests)
    one_call_s, burst_s = statistics.median(one_call), statistics.median(burst)
    return {"load_s": load_s, "compute_type_used": engine.loaded.compute.name,
            "kv_cache_dtype": str(engine.kv_cache_dtype).removeprefix("torch."),
            "new_tokens": FIXED_NEW,
            "one_call_tokens_per_s": tokens / one_call_s,
            "threads_tokens_per_s": tokens / burst_s,
            "first_burst_tokens_per_s": tokens / first_burst,
            "in_turn_tokens_per_s": tokens / in_turn,
            "threads_over_one_call": one_call_s / burst_s,
            "first_burst_over_one_call": one_call_s / first_burst,
            "decode_tokens_per_s": decode,
            "host_fraction": host_fraction, "host_ms_per_step": host_ms, "step_ms": step_ms,
            "sequential": one_by_one, "concurrent": together,
            "aggregate_speedup": together["tokens_per_s"] / one_by_one["tokens_per_s"],
            "itl_p99_over_single_stream": together["itl_p99_s"] / one_by_one["itl_p50_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.concurrency", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--compute-type", default="default")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    record = measure(args.model, args.compute_type, args.concurrency, args.prompt_tokens,
                     args.vocab, args.seed, args.threads, args.device)
    print(json.dumps({**vars(args), **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
