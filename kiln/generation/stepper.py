"""One engine step, start to end: plan, run, apply, hand out, propose.

    plan = scheduler.schedule()          under the engine's lock, no model
    runner.apply_moves(plan.moves)       slot compaction (and the draft's cache)
    for part in plan.split():            prompt chunks, then decode and verify rows:
        output = runner.execute(part)        the forward passes
        outcomes = updater.apply(part, out)  tokens, stop strings, finish reasons
        settle(outcomes)                     finished requests leave (lock), slots
                                             compacted, events handed out (no lock held)
    proposers.propose(...)               the next step's speculative proposals

A new request's first token thus goes out before the decode pass of its step, not after.

Faults are contained where they happen: a forward pass that raises fails only the requests
it computed (finish_reason "error", the traceback logged with their ids), a search that
raises fails only its request, a consumer that cannot take its events is logged and its
request aborted. Anything else (the bookkeeping itself failing) escapes, and the loop marks
the engine dead (loop.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .events import FinishReason, TokenEvent
from .proposers import Speculation
from .runner import ModelRunner
from .scheduler import Scheduler, SlotMove, StepPlan
from .search import TokenSearch
from .sequence import Sequence
from .updater import Outcome, Updater, ended, failed

log = logging.getLogger("kiln.engine")
UNCLAIMED_OUTPUTS = 1024  # finished requests kept for result() when nobody has asked yet


class Registry:
    """The engine's requests by id: live ones (waiting or running) and finished ones kept
    until their output is read. Guarded by the engine's lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: dict[int, Sequence] = {}
        self.finished: OrderedDict[int, Sequence] = OrderedDict()

    def get(self, request_id: int) -> Sequence | None:
        return self.live.get(request_id) or self.finished.get(request_id)

    def end(self, sequence: Sequence, reason: FinishReason,
            error: BaseException | None = None) -> None:
        """(under the lock)"""
        sequence.finish_reason, sequence.error = reason, error
        self.live.pop(sequence.id, None)
        self.finished[sequence.id] = sequence
        while len(self.finished) > UNCLAIMED_OUTPUTS:
            self.finished.popitem(last=False)


@dataclass
class StepTiming:
    """Where the engine's time goes, over the steps that ran the model: the forward passes
    and everything else of the step (planning, sampling, stop strings, events: host time)."""

    steps: int = 0
    rows: int = 0  # decode and verification rows, and prompt tokens
    seconds: float = 0.0
    forward_seconds: float = 0.0

    @property
    def host_seconds(self) -> float:
        return self.seconds - self.forward_seconds

    @property
    def host_fraction(self) -> float:
        return self.host_seconds / self.seconds if self.seconds else 0.0

    def reset(self) -> None:
        self.steps = self.rows = 0
        self.seconds = self.forward_seconds = 0.0


class Stepper:
    def __init__(self, registry: Registry, scheduler: Scheduler, runner: ModelRunner,
                 updater: Updater, proposers: Speculation) -> None:
        self.registry, self.scheduler, self.runner = registry, scheduler, runner
        self.updater, self.proposers = updater, proposers
        self.timing = StepTiming()
        # called once a batch of events has been handed out (AsyncEngine's one hop per step)
        self.after_delivery: list[Callable[[], None]] = []

    def step(self) -> list[TokenEvent]:
        began, forward = time.perf_counter(), self.runner.forward_seconds
        with self.registry.lock:
            plan = self.scheduler.schedule()
        rows = (sum(len(s.slots) for s in plan.decode) + plan.prefill_tokens
                + sum(len(s.proposal.tokens) + 1 for s in plan.verify))
        outcomes = [ended(sequence, FinishReason.ABORT) for sequence in plan.aborted]
        self.move(plan.moves)
        events = []
        for part in plan.split():  # prompts first: first tokens go out before the decode pass
            if part.runs_model or part.static_loads:
                outcomes += self._run(part)
            events += self.settle(outcomes)
            outcomes = []
        self._propose()
        if plan.runs_model:
            timing = self.timing
            timing.steps += 1
            timing.rows += rows
            timing.seconds += time.perf_counter() - began
            timing.forward_seconds += self.runner.forward_seconds - forward
        return events

    def _run(self, plan: StepPlan) -> list[Outcome]:
        try:
            output = self.runner.execute(plan)
            return self.updater.apply(plan, output)
        except Exception as error:  # noqa: BLE001 - only the requests of this step fail
            sequences = list(dict.fromkeys([*plan.sequences, *plan.static_loads]))
            log.error("a step failed; it fails request(s) %s",
                      ", ".join(str(s.id) for s in sequences), exc_info=True)
            return [failed(sequence, error) for sequence in sequences]

    def settle(self, outcomes: list[Outcome], release: bool = True) -> list[TokenEvent]:
        """Finished requests leave (their slots are free for the next step); every outcome's
        events go to its consumer, outside the lock. `release=False`: outcomes of requests
        that hold no slot (aborted while queued), settled outside a step."""
        ended_now = [o for o in outcomes if o.finish_reason is not None]
        with self.registry.lock:
            for outcome in ended_now:
                self.registry.end(outcome.sequence, outcome.finish_reason, outcome.error)
            moves = self.scheduler.release() if release else []
        self.move(moves)
        events = []
        for outcome in outcomes:
            self.deliver(outcome.sequence, outcome.events)
            events += outcome.events
        for outcome in ended_now:
            outcome.sequence.mailbox.notify()
            self.proposers.forget(outcome.sequence)
        self._delivered()
        return events

    def _delivered(self) -> None:
        for listener in list(self.after_delivery):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener's failure is its own
                log.error("an event listener failed", exc_info=True)

    def deliver(self, sequence: Sequence, events: list[TokenEvent]) -> None:
        if sequence.sink is None:
            sequence.mailbox.put(events)
            return
        for event in events:
            try:
                sequence.sink(event)
            except Exception:  # noqa: BLE001 - the consumer's fault: it loses its request
                log.error("the consumer of request %d failed to take an event; the request is "
                          "aborted", sequence.id, exc_info=True)
                sequence.abort_requested = True
                break

    def move(self, moves: list[SlotMove]) -> None:
        if moves:
            self.runner.apply_moves(moves)
            self.proposers.apply_moves(moves)

    def _propose(self) -> None:
        candidates = [s for s in self.scheduler.running
                      if not s.finished and not s.abort_requested and s.prompt_done
                      and isinstance(s.search, TokenSearch) and s.search.speculative_tokens]
        if not candidates:
            return
        try:
            self.proposers.propose(candidates)
        except Exception as error:  # noqa: BLE001 - the speculating requests fail, not the rest
            log.error("proposing tokens failed; it fails request(s) %s",
                      ", ".join(str(s.id) for s in candidates), exc_info=True)
            for sequence in candidates:
                sequence.proposal = None
            self.settle([failed(sequence, error) for sequence in candidates])

    def release_aborted(self) -> None:
        """Free the slots of aborted requests now, between steps (a caller-driven engine)."""
        with self.registry.lock:
            aborted = [s for s in self.scheduler.running if s.abort_requested and not s.finished]
            moves = self.scheduler.release(extra=aborted)
        self.move(moves)
        self.settle([ended(sequence, FinishReason.ABORT) for sequence in aborted])

    def fail_everything(self, error: BaseException) -> None:
        """The engine is dead: every live request ends with `error`."""
        with self.registry.lock:
            sequences = list(self.registry.live.values())
            self.scheduler.waiting.clear()
            self.scheduler.running = []
            for sequence in sequences:
                self.registry.end(sequence, FinishReason.ERROR, error)
        for sequence in sequences:
            try:
                self.deliver(sequence, failed(sequence, error).events)
            finally:
                sequence.mailbox.notify()
        self._delivered()
