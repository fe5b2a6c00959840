"""A request inside the engine: its state while it waits, runs and ends, and the mailbox its
consumer reads events from.

Only the engine's stepping thread changes a running sequence; callers touch a sequence only
through the engine (submit, abort) and its mailbox.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .events import FinishReason, TokenEvent

if TYPE_CHECKING:
    import torch

    from .requests import Request
    from .search import Search
    from .text_stream import TextStream


@dataclass
class Proposal:
    """Tokens proposed for a sequence's next step, verified by the target in one pass; the
    distributions they were drawn from (draft model, sampled requests), else None."""

    tokens: list[int]
    draft_probs: torch.Tensor | None = None


class Mailbox:
    """A request's events on their way to its consumer. Written by the stepping thread, read
    by the consumer's thread. Waiters say what wakes them: every event (a stream) or only the
    request's end (a wait for the result), so that a thread waiting for a result is not woken
    at every token (each wake-up costs the stepping thread a hand-over of the GIL)."""

    def __init__(self) -> None:
        self.events: deque[TokenEvent] = deque()
        self.watchers: list[tuple[threading.Condition, bool]] = []  # (waiter, wants events)

    def put(self, events: list[TokenEvent]) -> None:
        self.events.extend(events)
        self._wake(ending=False)

    def notify(self) -> None:
        """The request ended (or failed): wake every waiter."""
        self._wake(ending=True)

    def _wake(self, ending: bool) -> None:
        for watcher, wants_events in list(self.watchers):
            if ending or wants_events:
                with watcher:
                    watcher.notify_all()

    def take(self) -> list[TokenEvent]:
        taken = []
        while self.events:
            taken.append(self.events.popleft())
        return taken


@dataclass(eq=False)
class Sequence:
    id: int
    request: Request
    search: Search
    text: TextStream | None = None
    sink: Callable[[TokenEvent], None] | None = None  # events go here instead of the mailbox
    save_static: bool = False  # store the static prompt's keys/values once computed
    slots: list[int] = field(default_factory=list)
    computed: int = 0  # cache positions filled (the same for all of the request's rows)
    inputs: list[int] = field(default_factory=list)  # next decode input of each row
    draft_computed: int = 0  # positions of the draft model's cache that hold this request
    proposal: Proposal | None = None  # to verify in the next step
    reported: int = 0  # tokens reported so far
    abort_requested: bool = False
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    mailbox: Mailbox = field(default_factory=Mailbox)
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when it left the queue with its KV slots

    @property
    def prompt_done(self) -> bool:
        return self.computed >= len(self.request.prompt_ids)

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def rows(self) -> int:
        return self.search.rows

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
