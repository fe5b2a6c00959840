"""A request under the server's clocks: --queue-timeout while it waits for a slot,
--request-timeout for the whole of it."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator

from ..generation.events import FinishReason
from .api_errors import RETRY_AFTER_SECONDS, APIError

QUEUE_CHECK_SECONDS = 0.05  # how often a request without a token checks its queue time


async def timed_events(self, admitted) -> AsyncIterator:
    """`events` under the server's clocks. Before the first token: past --queue-timeout
    with a choice still queued, 503; past --request-timeout, 504 (nothing was sent, so
    an error can still be answered). After it: at --request-timeout the choices still
    running are stopped and end with finish_reason "length", their text kept, as when
    max_tokens is reached: a stream has begun, and a cut answer is more use to a client
    than none."""
    limits = self.limits
    deadline = admitted.arrived + (limits.request_timeout or math.inf)
    queue_deadline = admitted.arrived + limits.queue_timeout
    events = self.events(admitted)
    first, cut, pending = True, False, None
    try:
        while True:
            pending = asyncio.ensure_future(events.__anext__())
            while not cut:
                wait = deadline - time.perf_counter()
                if first:
                    wait = min(wait, QUEUE_CHECK_SECONDS)
                done, _ = await asyncio.wait({pending}, timeout=max(wait, 0.0))
                if done:
                    break
                now = time.perf_counter()
                if now >= deadline:
                    if first:
                        await _cancel(pending)
                        raise APIError(504, "no token within the server's request timeout "
                                            f"of {limits.request_timeout} s (kiln serve "
                                            "--request-timeout); retry later or shorten "
                                            "the prompt", "timeout", code="request_timeout")
                    cut = True  # their last events (with any held-back text) follow
                    for choice in admitted.choices:
                        if choice.finish_reason is None:
                            self.engine.abort(choice.request_id)
                elif first and now >= queue_deadline and any(
                        self.engine.is_waiting(c.request_id) for c in admitted.choices):
                    await _cancel(pending)
                    raise APIError(503, f"the request waited {limits.queue_timeout} s in "
                                        "the queue without a slot (kiln serve "
                                        "--queue-timeout); retry later",
                                   "service_unavailable", code="queue_timeout",
                                   headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
            try:
                choice, event = await pending
            except StopAsyncIteration:
                return
            first = False
            if cut and event.finish_reason == FinishReason.ABORT:
                event = dataclasses.replace(event, finish_reason=FinishReason.LENGTH)
                choice.finish_reason = FinishReason.LENGTH
            yield choice, event
    finally:  # also when the consumer leaves (a client gone) while a token is awaited
        if pending is not None and not pending.done():
            await _cancel(pending)
        await events.aclose()


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
