"""AsyncEngine: the engine for asyncio code.

`add_request` queues a request (checked at once: a bad one raises RequestError before any
work) and `stream(id)` yields its TokenEvents as the engine's thread produces them; leaving
the loop early (a client that went away) aborts the request, whose slots are free for the
next step. Events reach the event loop in one hop per step, not one per token: the engine's
thread collects a step's events for each event loop and, once the step has handed out all
of them, passes them over with a single `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ..errors import RequestError
from .engine import Engine, RequestOutput, TokenEvent
from .loaded_model import LoadedModel
from .loop import WAIT_SLICE
from .options import GenerationOptions


class AsyncEngine:
    def __init__(self, model: str | Path | LoadedModel | Engine | None = None,
                 **engine_options) -> None:
        self.engine = model if isinstance(model, Engine) else Engine(model, **engine_options)
        if not self.engine.config.runs_own_loop:
            raise ValueError("AsyncEngine needs an engine that steps on its own thread; this one "
                             "steps in the caller's thread (threaded=False, or a tensor-parallel "
                             "rank, which must run the same steps as the other ranks)")
        self._queues: dict[int, asyncio.Queue] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenEvent]]] = {}
        self.engine.after_delivery.append(self._flush)

    @property
    def alive(self) -> bool:
        return self.engine.alive

    def add_request(self, prompt: Sequence[int | str], options: GenerationOptions | None = None,
                    *, text: bool = False, skip_special_tokens: bool = True,
                    **option_kwargs) -> int:
        """Queue a request (see Engine.add_request); call from the event loop that streams it."""
        if self._closed:
            raise RequestError("the engine is shut down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:  # called on the engine's thread
            self._post(loop, queue, event)

        request_id = self.engine.add_request(prompt, options, text=text,
                                             skip_special_tokens=skip_special_tokens,
                                             sink=deliver, **option_kwargs)
        self._queues[request_id] = queue
        return request_id

    def _post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
              event: TokenEvent) -> None:
        with self._lock:
            self._batches.setdefault(loop, []).append((queue, event))

    def _flush(self) -> None:
        """(the engine's thread, after a step's events) One hop per event loop."""
        with self._lock:
            batches, self._batches = self._batches, {}
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(self._drain, batch)
            except RuntimeError:  # the event loop is closed: nobody reads these any more
                for request_id in {event.request_id for _, event in batch}:
                    self.engine.abort(request_id)

    @staticmethod
    def _drain(batch: list[tuple[asyncio.Queue, TokenEvent]]) -> None:
        for queue, event in batch:
            queue.put_nowait(event)

    async def stream(self, request_id: int, keep_output: bool = False) -> AsyncIterator[TokenEvent]:
        """The request's events; leaving early aborts it; a failed step raises its error.
        With `keep_output` its RequestOutput stays readable with `engine.result(id)`."""
        queue = self._queues.get(request_id)
        if queue is None:
            raise RequestError(f"no request {request_id} to stream in this engine")
        finished = False
        try:
            while True:
                event = await self._next(queue)
                if event.error is not None:
                    finished = True
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)
            self._queues.pop(request_id, None)
            if not keep_output:
                self.engine.release(request_id)

    async def _next(self, queue: asyncio.Queue) -> TokenEvent:
        """The queue's next event; EngineDeadError if the engine's loop died meanwhile (its
        death normally fails every request with that error; this is the backstop)."""
        while queue.empty():
            # Not asyncio.wait_for: before Python 3.12 it can swallow a cancellation that
            # arrives as the item does, and a consumer that was told to stop would go on.
            getter = asyncio.ensure_future(queue.get())
            try:
                done, _ = await asyncio.wait({getter}, timeout=WAIT_SLICE)
            except asyncio.CancelledError:
                getter.cancel()
                raise
            if done:
                return getter.result()
            getter.cancel()
            self.engine.check_alive()
        return queue.get_nowait()

    async def generate(self, prompt: Sequence[int | str], options: GenerationOptions | None = None,
                       **kwargs) -> RequestOutput:
        """Run one request to its end; its output (tokens, score, text)."""
        request_id = self.add_request(prompt, options, **kwargs)
        async for _ in self.stream(request_id, keep_output=True):
            pass
        return self.engine.result(request_id)

    def abort(self, request_id: int) -> None:
        self.engine.abort(request_id)

    def stats(self):
        return self.engine.stats()

    def is_waiting(self, request_id: int) -> bool:
        return self.engine.is_waiting(request_id)

    def queue_wait(self, request_id: int) -> float | None:
        return self.engine.queue_wait(request_id)

    def shutdown(self, timeout: float | None = None) -> None:
        """Abort what is left and stop the engine's thread."""
        self._closed = True
        self.engine.close(timeout)
