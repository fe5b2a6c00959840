"""Who runs an engine's steps, and how callers wait for their requests.

- `LoopThread` (the default): one thread of the engine's own, from start to close. It
  sleeps while there is no work, wakes on a submit or an abort, and steps while there is
  work. Callers only submit and wait for their own requests' events, so threads, asyncio
  code, the server and Ray replicas all get the same batched steps. If the thread ever dies
  on an error the engine could not contain, `on_death` fails every request with
  EngineDeadError; a waiter also notices a dead thread by itself within WAIT_SLICE seconds.
- `CallerDriver`: no thread; whoever waits for a request runs steps (one at a time) until it
  is done. For tensor-parallel ranks, which must all run identical steps, and for callers
  that step the engine themselves (`Engine.step()`).

The thread holds the engine only weakly: an engine nobody references is collected, and its
thread ends with it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable

from ..errors import EngineDeadError, KilnError
from .sequence import Mailbox

log = logging.getLogger("kiln.engine")
WAIT_SLICE = 0.25  # seconds between a waiter's checks that the loop still runs


def _weak(method: Callable, default):
    """A bound method that does not keep its object alive (`default` once it is gone)."""
    reference = weakref.WeakMethod(method)

    def call(*args):
        bound = reference()
        return default if bound is None else bound(*args)

    return call


class LoopThread:
    def __init__(self, owner: object, step: Callable[[], object], has_work: Callable[[], bool],
                 on_death: Callable[[BaseException], None],
                 start_up: Callable[[], None] | None = None) -> None:
        """`step` and `has_work` are bound methods of `owner`, held weakly; `on_death` and
        `start_up` (run first, on the thread) must not hold the owner strongly either."""
        self._step, self._has_work = _weak(step, None), _weak(has_work, False)
        self._on_death, self._start_up = on_death, start_up
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._wake = threading.Condition()
        self._closing = False
        self.error: BaseException | None = None  # what killed it
        self.dead: EngineDeadError | None = None  # what callers get from then on
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        weakref.finalize(owner, self.close, 0)  # the owner collected: the thread ends
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread.is_alive() or self._closing)

    def started(self) -> None:
        """Wait for the start-up work; raise what it raised (the thread then ends)."""
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop once the work left is done (the engine aborts what it wants gone first)."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def wait_for(self, ready: Callable[[], bool], mailboxes: Iterable[Mailbox],
                 events: bool = True) -> None:
        """Block until `ready()`, woken by the given mailboxes: at each event, or (`events`
        False) only when one of their requests ends."""
        if ready():
            return
        entry = (threading.Condition(), events)
        mailboxes = list(mailboxes)
        for mailbox in mailboxes:
            mailbox.watchers.append(entry)
        try:
            with entry[0]:
                while not ready():
                    self.check_alive()
                    entry[0].wait(WAIT_SLICE)
        finally:
            for mailbox in mailboxes:
                mailbox.watchers.remove(entry)

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead
        if not self.alive:
            cause = self.error or RuntimeError("the engine's thread is gone")
            self.dead = EngineDeadError(f"the engine stopped: {type(cause).__name__}: {cause}")
            self.dead.__cause__ = cause
            raise self.dead

    def _run(self) -> None:
        try:
            if self._start_up is not None:
                self._start_up()
        except BaseException as error:  # noqa: BLE001 - handed to the constructor
            self._start_error = error
            return
        finally:
            self._started.set()
            self._start_up = None  # what it holds (a model path, a LoadedModel) may go
        try:
            while True:
                with self._wake:
                    while not self._closing and not self._has_work():
                        self._wake.wait()
                    if self._closing and not self._has_work():
                        return
                self._step()
        except BaseException as error:  # noqa: BLE001 - anything: the engine is dead
            self.error = error
            self.dead = EngineDeadError(f"the engine stopped: {type(error).__name__}: {error}")
            self.dead.__cause__ = error
            log.critical("the engine's loop died; every request fails", exc_info=True)
            try:
                self._on_death(self.dead)
            except BaseException:  # noqa: BLE001 - waiters still see the death by themselves
                log.critical("failing the engine's requests failed too", exc_info=True)


class CallerDriver:
    """Steps run in the threads that wait: one steps, the others wait for its step to end."""

    def __init__(self, step: Callable[[], object], has_work: Callable[[], bool],
                 step_lock: threading.Lock) -> None:
        self._step, self._has_work = step, has_work
        self.step_lock = step_lock
        self._progress = threading.Condition()
        self._steps_done = 0
        self.dead: EngineDeadError | None = None

    def run_step(self):
        try:
            return self._step()
        except Exception as error:
            self.dead = EngineDeadError(f"the engine stopped: {type(error).__name__}: {error}")
            self.dead.__cause__ = error
            raise
        finally:
            with self._progress:
                self._steps_done += 1
                self._progress.notify_all()

    def wait_for(self, ready: Callable[[], bool], mailboxes: Iterable[Mailbox],  # noqa: ARG002
                 events: bool = True) -> None:  # noqa: ARG002
        """Step until `ready()`: step ourselves when no other thread is stepping, else wait for
        its step to end and look again."""
        while not ready():
            self.check_alive()
            with self._progress:
                seen = self._steps_done
            if self.step_lock.acquire(blocking=False):
                self.step_lock.release()
                if not ready():
                    if not self._has_work():
                        raise KilnError("the engine has no work left but a request is not done")
                    self.run_step()
                continue
            with self._progress:
                if self._steps_done == seen and not ready():
                    self._progress.wait(timeout=WAIT_SLICE)

    @property
    def alive(self) -> bool:
        return self.dead is None

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.dead

    def wake(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def close(self, timeout: float | None = None) -> None:  # noqa: ARG002
        return None
