"""The engine: continuous batching over the KV slot pool.

Requests wait in line (first come, first served) until enough slots are free. Each step
runs one decode token for every running request (or checks its speculative proposals) plus
at most `max_prefill_tokens_per_step` prompt tokens of newly admitted ones (chunked
prefill), picks the next tokens, reports them as TokenEvents and frees the slots of finished
requests in the same step. Every request has its own options (sampling, seed, penalties,
end tokens, stop strings, lengths), and its tokens do not depend on the requests it shares
steps with.

The pieces, each in its own module: the Scheduler plans a step without touching the model
(scheduler.py), the ModelRunner runs the plan (runner.py), the Updater turns logits into
tokens and events (updater.py), the Stepper ties one step together and contains its faults
(stepper.py), proposers make speculative proposals (proposers.py), and a loop thread of the
engine's own runs the steps (loop.py). Callers submit requests and wait on their own events
(consuming.py); they never drive steps (except on a caller-driven engine, `threaded=False`).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable
from collections.abc import Sequence as Tokens
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import RequestError
from .assembly import assemble
from .config import EngineConfig
from .consuming import Consuming
from .events import EngineStats, FinishReason, RequestOutput, TokenEvent
from .intake import row_seed
from .loaded_model import LoadedModel
from .loop import CallerDriver, LoopThread
from .options import GenerationOptions
from .requests import Request
from .search import Search
from .sequence import Sequence
from .sizing import cpu_has_amx
from .text_stream import TextStream
from .updater import ended

__all__ = ["Engine", "EngineStats", "FinishReason", "RequestOutput", "Submission", "TokenEvent",
           "cpu_has_amx", "row_seed"]


class Submission(NamedTuple):
    """A request for `Engine.submit_batch`: built by the engine's builder, with its search."""

    request: Request
    search: Search
    text: TextStream | None = None
    sink: Callable[[TokenEvent], None] | None = None
    cache_static_prompt: bool = True


class Engine(Consuming):
    """Continuous batching over a fixed pool of KV cache slots (see the module docstring).

    `Engine(model, config)` or `Engine(model, **options)` with EngineConfig's fields: the pool
    holds `max_batch_size` slots of `max_length` positions each (default: the model's
    context), or as many slots as `kv_cache_memory` (e.g. "2GiB") allows; on CPU the pool's
    memory is taken from the system only as positions are written. The engine's thread
    starts first and does all of the engine's PyTorch work, the load and the capture of the
    decode step (on CPU one trace serves every shape) included (assembly.py says why); the
    constructor returns once that is done, so no request waits for a capture.
    """

    def __init__(self, model: str | Path | LoadedModel | None = None,
                 config: EngineConfig | None = None, **options) -> None:
        config = (config or EngineConfig()).replace(**options)
        self.config = config
        self._ids = itertools.count()
        self._step_lock = threading.Lock()  # one step (or capture) at a time
        self._closed = False
        if not config.runs_own_loop:
            assemble(self, model, config)
            self._driver = CallerDriver(self._run_step, self.has_work, self._step_lock)
            return
        me = weakref.ref(self)  # the thread must not keep the engine alive
        self._driver = LoopThread(self, self._run_step, self.has_work,
                                  lambda error: me()._stepper.fail_everything(error),
                                  start_up=lambda: assemble(me(), model, config))
        self._driver.started()  # the model is loaded and the decode step captured, or raises

    # ------------------------------------------------------------ what it is

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def max_length(self) -> int:
        """Positions per sequence: a request's prompt plus its new tokens must fit."""
        return self.pool.slot_length

    @property
    def max_batch_size(self) -> int:
        return self.pool.num_slots

    @property
    def max_prefill_tokens_per_step(self) -> int:
        """Prompt tokens a step runs at most (the scheduler's `prefill_budget`)."""
        return self.scheduler.prefill_budget

    @property
    def alive(self) -> bool:
        """False once the engine's loop died (every call then raises EngineDeadError)."""
        return self._driver.alive

    def stats(self) -> EngineStats:
        with self._registry.lock:
            return self.scheduler.stats()

    def is_waiting(self, request_id: int) -> bool:
        """True while the request waits in the queue for its KV slots."""
        with self._registry.lock:
            sequence = self._registry.live.get(request_id)
        return sequence is not None and sequence.started_at is None and not sequence.finished

    def queue_wait(self, request_id: int) -> float | None:
        """Seconds the request waited in the queue for its KV slots; None while it waits,
        when it ended without a slot, or for an unknown request."""
        with self._registry.lock:
            sequence = self._registry.get(request_id)
        if sequence is None or sequence.started_at is None:
            return None
        return sequence.started_at - sequence.submitted_at

    def has_work(self) -> bool:
        with self._registry.lock:
            return self.scheduler.has_work()

    def warm_up(self, positions: int | None = None) -> None:
        """Capture the decode steps now (default: for sequences of up to 512 positions), so
        that no stream waits for one later. On CPU one trace serves every shape and is made
        when the engine starts; on CUDA a graph per batch bucket and attention length."""
        with self._step_lock, torch.inference_mode():
            self.runner.warm_up(min(positions or 512, self.max_length))

    # ------------------------------------------------------------ requests

    def search_for(self, request: Request, options: GenerationOptions, end_ids=None,
                   processors=None, row: int = 0) -> Search:
        """The search a request runs with (intake.py)."""
        return self.intake.search_for(request, options, end_ids, processors, row)

    def require_tokenizer(self):
        return self.intake.require_tokenizer()

    def add_request(self, prompt: Tokens[int | str], options: GenerationOptions | None = None,
                    *, text: bool = False, skip_special_tokens: bool = True,
                    sink: Callable[[TokenEvent], None] | None = None, **option_kwargs) -> int:
        """Queue a prompt (token ids or strings); return the request's id. `options` (or
        keyword arguments, GenerationOptions' fields) apply to this request only. With
        `text=True` events carry the decoded text and `stop` strings apply (stop strings
        imply it). `sink`, if given, receives the request's events on the engine's thread
        instead of `stream()`. A request that cannot fit the engine is refused here with
        RequestError."""
        if options is None:
            options = GenerationOptions.from_kwargs(**option_kwargs)
        elif option_kwargs:
            options = options.replace(**option_kwargs)
        request = self.intake.request(prompt, options)
        stream = None
        if text or options.stop_strings:
            stream = self.intake.text_stream(request, options, skip_special_tokens)
        return self.submit(request, self.search_for(request, options), stream, sink,
                           options.cache_static_prompt)

    def submit(self, request: Request, search: Search, text: TextStream | None = None,
               sink: Callable[[TokenEvent], None] | None = None,
               cache_static_prompt: bool = True) -> int:
        """Queue a request built by `builder` with its search (see add_request)."""
        return self.submit_batch([Submission(request, search, text, sink, cache_static_prompt)])[0]

    def submit_batch(self, items: list[Submission]) -> list[int]:
        """Queue several requests at once, all checked before any is queued, so that one step
        sees them all together."""
        sequences = []
        for request, search, text, sink, cache_static in items:
            if search.rows > self.pool.num_slots:
                raise RequestError(f"beam_size={search.rows} needs {search.rows} cache slots but "
                                   f"the engine has {self.pool.num_slots}; lower beam_size or "
                                   "raise max_batch_size")
            if request.total_length > self.max_length:
                self.builder.check_fits(len(request.prompt_ids), request.max_new_tokens,
                                        self.max_length)
            sequences.append(Sequence(0, request, search, text, sink,
                                      save_static=bool(request.static_length and cache_static)))
        with self._registry.lock:
            self._driver.check_alive()
            if self._closed:
                raise RequestError("the engine is closed; start a new one")
            for sequence in sequences:
                sequence.id = next(self._ids)
                self._registry.live[sequence.id] = sequence
                self.scheduler.add(sequence)
        self._driver.wake()
        return [sequence.id for sequence in sequences]

    def abort(self, request_id: int) -> None:
        """Stop a request: it ends with finish_reason "abort" and its slots are free for the
        next step. Unknown or finished ids are ignored."""
        with self._registry.lock:
            sequence = self._registry.live.get(request_id)
            if sequence is None:
                return
            queued = self.scheduler.remove_waiting(sequence)
            if not queued:
                sequence.abort_requested = True
        if queued:
            self._stepper.settle([ended(sequence, FinishReason.ABORT)], release=False)
        elif isinstance(self._driver, CallerDriver) and self._step_lock.acquire(blocking=False):
            try:  # no step under way: free the slots now
                self._stepper.release_aborted()
            finally:
                self._step_lock.release()
        self._driver.wake()

    def close(self, timeout: float | None = 10.0) -> None:
        """Refuse new requests, abort the live ones and stop the engine's thread."""
        with self._registry.lock:
            self._closed = True
            live = list(self._registry.live)
        for request_id in live:
            self.abort(request_id)
        self._driver.close(timeout)

    def check_alive(self) -> None:
        """Raise EngineDeadError if the engine's loop died."""
        self._driver.check_alive()

    # ------------------------------------------------------------ stepping

    def step(self) -> list[TokenEvent]:
        """Run one step in this thread and return its events: only on a caller-driven engine
        (`threaded=False`); a threaded engine steps by itself."""
        if not isinstance(self._driver, CallerDriver):
            raise RuntimeError("this engine runs its own loop thread; create it with "
                               "threaded=False to step it yourself")
        return self._driver.run_step()

    def _run_step(self) -> list[TokenEvent]:
        with self._step_lock, torch.inference_mode():
            return self._stepper.step()
