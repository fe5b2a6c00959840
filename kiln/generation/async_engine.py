"""AsyncEngine: the engine for asyncio code, its steps run by a thread of its own.

`add_request` queues a request (checked at once: a bad one raises RequestError before any
work) and `stream(id)` yields its TokenEvents as the engine thread produces them; leaving
the loop early (a client that went away) aborts the request, whose slots are free for the
next step. The loop thread sleeps while there is no work.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from ..errors import RequestError
from .engine import Engine, RequestOutput, TokenEvent
from .loaded_model import LoadedModel
from .options import GenerationOptions


class AsyncEngine:
    def __init__(self, model: str | Path | LoadedModel | Engine | None = None,
                 **engine_options) -> None:
        self.engine = model if isinstance(model, Engine) else Engine(model, **engine_options)
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._closed = False
        self.engine.on_work = self._on_work
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    def add_request(self, prompt: Sequence[int | str], options: GenerationOptions | None = None,
                    *, text: bool = False, skip_special_tokens: bool = True,
                    **option_kwargs) -> int:
        """Queue a request (see Engine.add_request); call from the event loop that streams it."""
        if self._closed:
            raise RequestError("the engine is shut down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(event: TokenEvent) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(queue.put_nowait, event)

        request_id = self.engine.add_request(prompt, options, text=text,
                                             skip_special_tokens=skip_special_tokens,
                                             sink=deliver, **option_kwargs)
        self._queues[request_id] = (loop, queue)
        return request_id

    async def stream(self, request_id: int, keep_output: bool = False) -> AsyncIterator[TokenEvent]:
        """The request's events; leaving early aborts it; a failed step raises its error.
        With `keep_output` its RequestOutput stays readable with `engine.result(id)`."""
        if request_id not in self._queues:
            raise RequestError(f"no request {request_id} to stream in this engine")
        _, queue = self._queues[request_id]
        finished = False
        try:
            while True:
                event = await queue.get()
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

    def shutdown(self, timeout: float | None = None) -> None:
        """Abort what is left and stop the engine thread."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for request_id in list(self._queues):
            self.engine.abort(request_id)
        self._thread.join(timeout)

    def _on_work(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self.engine.has_work():
                    self._wake.wait()
                if self._closed and not self.engine.has_work():
                    return
            self.engine.step()  # failures inside a step end its requests, not this thread
