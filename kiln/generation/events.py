"""What an engine hands back: a TokenEvent per token (and one to say a request ended), why it
ended (FinishReason), and a finished request's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .requests import Request
    from .search import Search


class FinishReason(str, Enum):
    """Why a request ended. A str, so `reason == "stop"` and JSON keep working."""

    LENGTH = "length"  # max_length new tokens
    STOP = "stop"  # an end token or a stop string
    ABORT = "abort"  # the caller aborted it (or left its stream)
    ERROR = "error"  # a step failed for it; the event carries the error

    def __str__(self) -> str:
        return self.value


@dataclass
class TokenEvent:
    """What a step produced for a request: a token (None when the request ended on a hidden
    end token, was aborted or failed), the text it added (text requests), its log-probability
    under the model, and on the request's last event, why it finished."""

    request_id: int
    token_id: int | None
    text: str = ""
    log_prob: float | None = None
    index: int = 0  # how many tokens the request reported before this one
    finish_reason: FinishReason | None = None  # set on the last event
    error: BaseException | None = None  # the step failed: the request ends with this error
    top_log_probs: list[tuple[int, float]] | None = None  # (token, log_prob), top_logprobs > 0


@dataclass
class RequestOutput:
    request_id: int
    request: Request
    search: Search
    finish_reason: FinishReason
    text: str | None = None  # the whole continuation, for text requests

    @property
    def result(self):
        """The search's result: a RowState (tokens, score, logits), beam hypotheses,
        alternatives' expansions or scores."""
        return self.search.result()


@dataclass
class EngineStats:
    waiting: int
    running: int
    slots: int
    slots_used: int
