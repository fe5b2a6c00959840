"""A request's continuation as text, as it is generated: decoded token by token, never split
inside a UTF-8 character, and cut before the first stop string."""

from __future__ import annotations

from collections.abc import Sequence

from .stop_strings import StopMatcher
from .tokenizer import StreamingDetokenizer, Tokenizer


class TextStream:
    """Text that could still turn out to be the start of a stop string is held back until it
    cannot. The cost per token is linear in the text it adds, whatever the stop strings."""

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int],
                 stops: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.detokenizer = StreamingDetokenizer(tokenizer, context_ids, skip_special_tokens)
        self.stops = tuple(stops)
        self._matcher = StopMatcher(self.stops) if self.stops else None
        self._given: list[str] = []  # text already given out, in pieces
        self._pending = ""  # decoded text not given out yet (held back)
        self.released = 0  # characters given out
        self.stopped = False

    @property
    def text(self) -> str:
        """The decoded continuation so far (given out or held back)."""
        return self.released_text + self._pending

    @property
    def released_text(self) -> str:
        if len(self._given) > 1:
            self._given = ["".join(self._given)]
        return self._given[0] if self._given else ""

    def add(self, token_id: int) -> str:
        """New text to give out after this token; sets `stopped` once a stop string shows."""
        return self._extend(self.detokenizer.add(token_id))

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        if self.stopped:
            return ""
        tail = self._extend(self.detokenizer.finish())
        if self.stopped:
            return tail
        return tail + self._release(len(self._pending))

    def _extend(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self._pending += piece
        if self._matcher is None:
            return self._release(len(self._pending))
        cut = self._matcher.feed(piece)
        if cut is not None:
            self.stopped = True
            given = self._release(cut - self.released)
            self._pending = ""
            return given
        return self._release(len(self._pending) - self._matcher.held)

    def _release(self, count: int) -> str:
        if count <= 0:
            return ""
        given, self._pending = self._pending[:count], self._pending[count:]
        self._given.append(given)
        self.released += count
        return given
