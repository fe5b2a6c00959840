"""OpenAI response bodies: whole completions and streamed chunks, for /v1/completions
(`text_completion`) and /v1/chat/completions (`chat.completion`), with their logprobs."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Callable

from ..generation.engine import TokenEvent
from .service import Admitted, ModelService

NO_PROBABILITY = -9999.0  # what OpenAI reports for a token the model gives no chance


def finite(log_prob: float | None) -> float | None:
    """A log-probability JSON can carry: -inf and NaN become NO_PROBABILITY."""
    if log_prob is None or math.isfinite(log_prob):
        return log_prob
    return NO_PROBABILITY


class Logprobs:
    """One choice's logprobs in the endpoint's shape, built token by token."""

    def __init__(self, chat: bool, top: int, token_text: Callable[[int], str]) -> None:
        self.chat, self.top, self.token_text = chat, top, token_text
        self.entries: list[dict] = []  # chat: content entries
        self.tokens: list[str] = []  # completions: parallel lists
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.text_offset: list[int] = []
        self.offset = 0

    def add(self, event: TokenEvent) -> None:
        text = self.token_text(event.token_id)
        alternatives = [(self.token_text(t), finite(p))
                        for t, p in (event.top_log_probs or [])][: self.top]
        log_prob = finite(event.log_prob)
        if self.chat:
            self.entries.append({"token": text, "logprob": log_prob,
                                 "bytes": list(text.encode("utf-8")),
                                 "top_logprobs": [{"token": t, "logprob": p,
                                                   "bytes": list(t.encode("utf-8"))}
                                                  for t, p in alternatives]})
            return
        self.tokens.append(text)
        self.token_logprobs.append(log_prob)
        self.top_logprobs.append(dict(alternatives))
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def body(self) -> dict:
        if self.chat:
            return {"content": self.entries}
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs if self.top else None,
                "text_offset": self.text_offset}

    @property
    def pending(self) -> bool:
        return bool(self.entries or self.tokens)

    def take(self) -> dict:
        """The entries added since the last take (a streamed chunk's share)."""
        body = self.body()
        self.entries, self.tokens, self.token_logprobs = [], [], []
        self.top_logprobs, self.text_offset = [], []
        return body


class Formatter:
    """Response bodies of one HTTP request."""

    def __init__(self, service: ModelService, admitted: Admitted, chat: bool) -> None:
        self.service, self.admitted, self.chat = service, admitted, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"
        count = len(admitted.choices)
        self.texts = [""] * count
        self.finish = [None] * count
        self.logprobs = [Logprobs(chat, admitted.top_logprobs, service.token_text)
                         if admitted.top_logprobs is not None else None for _ in range(count)]

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.admitted.created,
                "model": self.service.served_model_name}

    def add(self, index: int, event: TokenEvent) -> None:
        self.texts[index] += event.text
        if event.token_id is not None and self.logprobs[index] is not None:
            self.logprobs[index].add(event)
        if event.finish_reason is not None:
            self.finish[index] = event.finish_reason

    async def whole(self, events: AsyncIterator) -> dict:
        try:
            async for choice, event in events:
                self.add(choice.index, event)
        finally:  # closed now, not when collected: its engine requests are aborted at once
            await events.aclose()
        choices = []
        for index, text in enumerate(self.texts):
            logprobs = self.logprobs[index].body() if self.logprobs[index] else None
            choice = {"index": index, "logprobs": logprobs, "finish_reason": self.finish[index]}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": self.admitted.usage}

    async def chunks(self, events: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk per piece of text (or token, with logprobs); the last
        chunk of each choice carries its finish_reason; then usage if asked; then [DONE]."""
        object_name = "chat.completion.chunk" if self.chat else "text_completion"
        usage = {"usage": None} if include_usage else {}
        if self.chat:  # the role first, as OpenAI does
            for choice in self.admitted.choices:
                yield _sse({**self._head(object_name), "choices": [{
                    "index": choice.index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}], **usage})
        try:
            async for choice, event in events:
                index = choice.index
                self.add(index, event)
                logprobs = self.logprobs[index]
                if not event.text and event.finish_reason is None and not (
                        logprobs and logprobs.pending):
                    continue  # text held back (a partial character or a possible stop string)
                body = logprobs.take() if logprobs else None
                if self.chat:
                    delta = {"content": event.text} if event.text else {}
                    entry = {"index": index, "delta": delta}
                else:
                    entry = {"index": index, "text": event.text}
                entry.update(logprobs=body, finish_reason=event.finish_reason)
                yield _sse({**self._head(object_name), "choices": [entry], **usage})
        finally:  # a client gone: the events close now, aborting their engine requests
            await events.aclose()
        if include_usage:
            yield _sse({**self._head(object_name), "choices": [], "usage": self.admitted.usage})
        yield "data: [DONE]\n\n"


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
