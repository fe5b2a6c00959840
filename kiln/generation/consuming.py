"""How callers read an engine's requests: streams of events, waiting for whole outputs,
polling several at once. The Engine mixes this in; it needs the engine's request registry,
its driver (the loop thread, or the caller driving steps) and `abort`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..errors import RequestError
from .events import RequestOutput, TokenEvent
from .sequence import Sequence


class Consuming:
    def stream(self, request_id: int) -> Iterator[TokenEvent]:
        """The request's events as they come. Leaving the loop early aborts the request; an
        error inside a step is raised here."""
        sequence = self._sequence(request_id)
        mailbox, finished = sequence.mailbox, False
        try:
            while True:
                self._driver.wait_for(lambda: bool(mailbox.events), [mailbox])
                for event in mailbox.take():
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
            self.release(request_id)

    def wait(self, request_ids: Iterable[int]) -> list[RequestOutput]:
        """Wait until every given request has finished; their outputs, in order. A request
        that failed raises its error (the others are aborted)."""
        sequences = [self._sequence(request_id) for request_id in request_ids]
        try:
            self._driver.wait_for(
                lambda: all(s.finished for s in sequences)
                or any(s.error is not None for s in sequences),
                [s.mailbox for s in sequences], events=False)
        finally:  # on an error (or an interrupt) the others stop too
            for sequence in sequences:
                if not sequence.finished:
                    self.abort(sequence.id)
        outputs = []
        for sequence in sequences:
            self.release(sequence.id)
            outputs.append(output_of(sequence))
        return outputs

    def result(self, request_id: int) -> RequestOutput:
        return self.wait([request_id])[0]

    def poll(self, request_ids: Iterable[int]) -> list[TokenEvent]:
        """Wait until one of the requests has events; all their queued events, in order.
        Finished requests stay readable with `wait`/`result`."""
        sequences = [self._sequence(request_id) for request_id in request_ids]
        self._driver.wait_for(lambda: any(s.mailbox.events for s in sequences),
                              [s.mailbox for s in sequences])
        return [event for sequence in sequences for event in sequence.mailbox.take()]

    def release(self, request_id: int) -> None:
        """Forget a finished request's output (stream() does this itself)."""
        with self._registry.lock:
            self._registry.finished.pop(request_id, None)

    def _sequence(self, request_id: int) -> Sequence:
        with self._registry.lock:
            sequence = self._registry.get(request_id)
        if sequence is None:
            self._driver.check_alive()
            raise RequestError(f"no request {request_id} in this engine (finished requests are "
                               "kept until their result is read)")
        return sequence


def output_of(sequence: Sequence) -> RequestOutput:
    """A finished request's output; a failed one raises its error."""
    if sequence.error is not None:
        raise sequence.error
    text = sequence.text.released_text if sequence.text is not None else None
    return RequestOutput(sequence.id, sequence.request, sequence.search, sequence.finish_reason,
                         text)
