"""What the HTTP layer calls: the served model on its AsyncEngine, with the server's rules
(loading / ready / draining, the queue limit, one model name) and its metrics.

Every check that can refuse a request runs before any work for it: the queue limit before
tokenizing, the context limit before the engine sees it. An admitted request's choices are
engine requests; leaving `events` early (a client gone) aborts them, so their KV slots are
free for the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..errors import RequestError
from ..generation.async_engine import AsyncEngine
from ..generation.engine import TokenEvent
from ..generation.text import chat_prompt
from .metrics import ServerMetrics
from .protocol import BadField, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kiln.serve")
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Choice:
    """One generated sequence of an HTTP request: an engine request."""

    index: int
    request_id: int
    prompt_tokens: int
    arrived: float
    completion_tokens: int = 0
    finish_reason: str | None = None
    last_token_at: float | None = None


@dataclass
class Admitted:
    choices: list[Choice]
    top_logprobs: int | None  # None: no logprobs asked
    n: int = 1  # choices per prompt (prompt tokens count once per prompt)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for c in self.choices if c.index % self.n == 0)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class ModelService:
    def __init__(self, load: Callable[[], AsyncEngine], served_model_name: str, *,
                 max_queue: int = 64, default_options: dict | None = None) -> None:
        self._load = load
        self.default_options = dict(default_options or {})
        self.served_model_name = served_model_name
        self.max_queue = max_queue
        self.state = "loading"  # -> "ready" -> "draining"; or "failed"
        self.engine: AsyncEngine | None = None
        self.in_flight = 0  # HTTP requests being answered
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine else None)
        self.started = int(time.time())

    # ------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Load the model (blocking: run it in a thread); the service is ready after."""
        try:
            engine = self._load()
        except BaseException:
            self.state = "failed"
            raise
        loaded = engine.engine.loaded
        self.tokenizer = engine.engine.require_tokenizer()
        self.chat_template = loaded.chat_template
        self.model_path = loaded.path
        self.engine = engine
        if self.state == "loading":
            self.state = "ready"
        log.info("serving %s as %r", loaded.path, self.served_model_name)

    def start_draining(self) -> None:
        if self.state != "draining":
            log.info("shutting down: no new requests; %d in flight", self.in_flight)
        self.state = "draining"

    def close(self) -> None:
        """Abort what is still running and stop the engine thread."""
        if self.engine is not None:
            self.engine.shutdown(timeout=10)

    @property
    def health(self) -> str:
        """"ok", or why the service cannot answer: loading, shutting down, failed (the model
        did not load), or engine dead (its loop stopped on an error it could not contain)."""
        if self.state == "ready" and self.engine is not None and not self.engine.alive:
            return "engine dead"
        return {"ready": "ok", "loading": "loading", "draining": "shutting down",
                "failed": "failed"}[self.state]

    def check_ready(self) -> None:
        if self.health == "ok":
            return
        reason = {"loading": "the model is still loading", "shutting down": "the server is shutting down",
                  "failed": "the model failed to load",
                  "engine dead": "the engine stopped on an internal error"}[self.health]
        raise APIError(503, f"{reason}; retry later", "service_unavailable",
                       code="service_unavailable",
                       headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.served_model_name!r}", param="model",
                           code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.started,
                "owned_by": "kiln", "root": str(self.model_path),
                "max_model_len": self.engine.engine.max_length}

    # ------------------------------------------------------------ admission

    def _reserve(self, count: int, param: str) -> None:
        """The queue limit, checked before any tokenizing: 429 when the new choices would
        wait beyond `max_queue`."""
        if count > self.max_queue:
            raise bad_request(f"this request needs {count} sequences, more than the server's "
                              f"queue holds ({self.max_queue}); send fewer prompts or a lower n",
                              param)
        waiting = self.engine.stats().waiting
        if waiting + count > self.max_queue:
            raise APIError(429, f"the server is busy ({waiting} requests queued, at most "
                                f"{self.max_queue}); retry later", "rate_limit_exceeded",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def admit_completion(self, request: CompletionRequest) -> Admitted:
        prompts = self._refuse_bad(request, request.prompts)
        self._reserve(len(prompts) * request.n, "prompt")
        ids = []
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids.append(self.tokenizer.encode(prompt))
            else:
                limit = self.engine.engine.spec.usable_vocab_size
                if any(not 0 <= token < limit for token in prompt):
                    raise bad_request(f"prompt {index} holds token ids outside the vocabulary "
                                      f"(0..{limit - 1})", "prompt")
                ids.append(prompt)
        return self._admit(request, ids, request.max_tokens, request.logprobs)

    def admit_chat(self, request: ChatCompletionRequest) -> Admitted:
        self._refuse_bad(request, lambda: None)
        self._reserve(request.n, "n")
        try:
            text = chat_prompt(self.chat_template, self.model_path, request.conversation())
        except (RequestError, ValueError) as error:
            raise bad_request(str(error), "messages") from error
        # The template writes the special tokens itself: the tokenizer must not add more.
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        top = (request.top_logprobs or 0) if request.logprobs else None
        return self._admit(request, [ids], request.new_token_limit, top)

    def _refuse_bad(self, request, check: Callable):
        self.check_ready()
        self.check_model(request.model)
        try:
            request.refuse_unsupported()
            return check()
        except BadField as error:
            raise bad_request(str(error), error.param) from error

    def _admit(self, request, prompts: list[list[int]], max_tokens: int | None,
               top_logprobs: int | None) -> Admitted:
        context = self.engine.engine.max_length
        for index, ids in enumerate(prompts):
            if not ids:
                raise bad_request(f"prompt {index} is empty", "prompt")
            room = context - len(ids)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = f" plus max_tokens={max_tokens}" if max_tokens is not None else ""
                where = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
                raise bad_request(
                    f"this model's maximum context length is {context} tokens; the prompt has "
                    f"{len(ids)} tokens{asked}; shorten the prompt or lower max_tokens",
                    "max_tokens" if room >= 1 else where, code="context_length_exceeded")
        now = time.perf_counter()
        choices: list[Choice] = []
        try:
            for prompt_index, ids in enumerate(prompts):
                new_tokens = max_tokens or context - len(ids)
                options = {**self.default_options,
                           **request.engine_options(new_tokens, top_logprobs or 0)}
                for sample in range(request.n):
                    request_id = self.engine.add_request(
                        ids, text=True, seed=request.choice_seed(sample), **options)
                    choices.append(Choice(prompt_index * request.n + sample, request_id,
                                          len(ids), now))
        except RequestError as error:
            for choice in choices:
                self.engine.abort(choice.request_id)
            raise bad_request(str(error)) from error
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
        return Admitted(choices, top_logprobs, n=request.n)

    # ------------------------------------------------------------ generation

    async def events(self, admitted: Admitted) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """The choices' token events as they come (interleaved when there are several).
        Leaving early aborts every choice still running."""
        choices = admitted.choices
        if len(choices) == 1:
            async for event in self.engine.stream(choices[0].request_id):
                yield choices[0], self._count(choices[0], event)
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for event in self.engine.stream(choice.request_id):
                    await queue.put((choice, event, None))
            except Exception as error:  # noqa: BLE001 - handed to the consumer
                await queue.put((choice, None, error))

        tasks = [asyncio.ensure_future(pump(choice)) for choice in choices]
        try:
            left = len(choices)
            while left:
                choice, event, error = await queue.get()
                if error is not None:
                    raise error
                yield choice, self._count(choice, event)
                if event.finish_reason is not None:
                    left -= 1
        finally:
            for task in tasks:
                task.cancel()  # each stream aborts its request as it closes
            await asyncio.gather(*tasks, return_exceptions=True)

    def _count(self, choice: Choice, event: TokenEvent) -> TokenEvent:
        now = time.perf_counter()
        if event.token_id is not None:
            choice.completion_tokens += 1
            self.metrics.generated_tokens.inc()
            if choice.last_token_at is None:
                self.metrics.ttft.observe(now - choice.arrived)
            else:
                self.metrics.itl.observe(now - choice.last_token_at)
            choice.last_token_at = now
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason
            self.metrics.finished.labels(event.finish_reason).inc()
            self.metrics.e2e.observe(now - choice.arrived)
            if event.finish_reason == "abort":
                self.metrics.aborted.inc()
        return event

    def note_abandoned(self, admitted: Admitted) -> None:
        """The client left before the end: count its unfinished choices as aborted."""
        for choice in admitted.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.metrics.aborted.inc()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
