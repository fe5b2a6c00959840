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
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..errors import RequestError
from ..generation.async_engine import AsyncEngine
from ..generation.engine import TokenEvent
from ..generation.text import chat_prompt
from .api_errors import RETRY_AFTER_SECONDS, APIError, bad_request  # noqa: F401 - re-exported
from .deadlines import timed_events
from .lifecycle import ServedModel
from .limits import ServeLimits
from .metrics import ServerMetrics
from .protocol import BadField, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kiln.serve")
TOKENIZE_IN_THREAD_CHARS = 20_000  # longer prompts are tokenized off the event loop


@dataclass
class Choice:
    """One generated sequence of an HTTP request: an engine request."""

    index: int
    request_id: int
    prompt_tokens: int
    arrived: float
    completion_tokens: int = 0
    finish_reason: str | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


@dataclass
class Admitted:
    choices: list[Choice]
    top_logprobs: int | None  # None: no logprobs asked
    n: int = 1  # choices per prompt (prompt tokens count once per prompt)
    created: int = field(default_factory=lambda: int(time.time()))
    client: str = ""
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def ttft(self) -> float | None:
        firsts = [c.first_token_at for c in self.choices if c.first_token_at is not None]
        return min(firsts) - self.arrived if firsts else None

    @property
    def usage(self) -> dict:
        prompt = sum(c.prompt_tokens for c in self.choices if c.index % self.n == 0)
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}


class ModelService(ServedModel):
    """A text-generation model on its AsyncEngine."""

    def __init__(self, load: Callable[[], AsyncEngine], served_model_name: str, *,
                 limits: ServeLimits | None = None, default_options: dict | None = None) -> None:
        super().__init__(load, served_model_name, limits=limits)
        self.default_options = dict(default_options or {})
        self.max_queue = self.limits.max_queue
        self.by_client: defaultdict[str, set[int]] = defaultdict(set)  # live engine requests
        self.engine: AsyncEngine | None = None
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine else None)

    # ------------------------------------------------------------ lifecycle

    def _loaded(self, engine: AsyncEngine) -> None:
        loaded = engine.engine.loaded
        self.tokenizer = engine.engine.require_tokenizer()
        self.chat_template = loaded.chat_template
        self.model_path = loaded.path
        self.engine = engine
        log.info("serving %s as %r", loaded.path, self.served_model_name)

    def _alive(self) -> bool:
        return self.engine is not None and self.engine.alive

    def close(self) -> None:
        """Abort what is still running and stop the engine thread."""
        if self.engine is not None:
            self.engine.shutdown(timeout=10)

    def model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.started,
                "owned_by": "kiln", "root": str(self.model_path),
                "max_model_len": self.engine.engine.max_length}

    # ------------------------------------------------------------ admission

    def _reserve(self, count: int, param: str, client: str) -> None:
        """The per-request, queue and per-client limits, checked before any tokenizing."""
        limits = self.limits
        if count > limits.max_choices:
            raise bad_request(f"this request asks for {count} sequences (prompts x n); the "
                              f"server allows {limits.max_choices} per request (kiln serve "
                              "--max-choices); send fewer prompts or a lower n", param,
                              code="too_many_choices")
        if count > limits.max_queue:
            raise bad_request(f"this request needs {count} sequences, more than the server's "
                              f"queue holds ({limits.max_queue}); send fewer prompts or a lower n",
                              param)
        waiting = self.engine.stats().waiting
        if waiting + count > limits.max_queue:
            raise APIError(429, f"the server is busy ({waiting} requests queued, at most "
                                f"{limits.max_queue}, kiln serve --max-queue); retry later",
                           "rate_limit_exceeded", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        share = limits.queue_per_client
        mine = sum(1 for request_id in self.by_client.get(client, ())
                   if self.engine.is_waiting(request_id))
        if mine + count > share:
            raise APIError(429, f"this client already has {mine} requests queued, at most "
                                f"{share} (kiln serve --max-queue-per-client); retry later",
                           "rate_limit_exceeded", code="client_queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    def _check_text(self, texts: list[str], param: str) -> None:
        limits = self.limits
        characters = sum(len(text) for text in texts)
        if characters > limits.max_prompt_chars:
            raise bad_request(f"the {param} hold {characters} characters; the server allows "
                              f"{limits.max_prompt_chars} per request (kiln serve "
                              "--max-prompt-chars)", param, code="prompt_too_long")

    def _check_stop(self, request) -> None:
        stops = request.stop or []
        if len(stops) > self.limits.max_stop_count:
            raise bad_request(f"at most {self.limits.max_stop_count} stop sequences (kiln serve "
                              f"--max-stop-count), got {len(stops)}", "stop")
        for stop in stops:
            if len(stop) > self.limits.max_stop_chars:
                raise bad_request(f"a stop sequence has {len(stop)} characters, at most "
                                  f"{self.limits.max_stop_chars} (kiln serve --max-stop-chars)",
                                  "stop")

    async def _encode(self, text: str, **kwargs) -> list[int]:
        if len(text) > TOKENIZE_IN_THREAD_CHARS:  # keep the event loop for the other clients
            return await asyncio.to_thread(self.tokenizer.encode, text, **kwargs)
        return self.tokenizer.encode(text, **kwargs)

    async def admit_completion(self, request: CompletionRequest, client: str = "") -> Admitted:
        prompts = self._refuse_bad(request, request.prompts)
        self._check_text([p for p in prompts if isinstance(p, str)], "prompt")
        self._reserve(len(prompts) * request.n, "prompt", client)
        ids = []
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                if not prompt:
                    raise bad_request(f"prompt {index} is empty; give at least one token",
                                      "prompt")
                ids.append(await self._encode(prompt))
            else:
                limit = self.engine.engine.spec.usable_vocab_size
                if any(not 0 <= token < limit for token in prompt):
                    raise bad_request(f"prompt {index} holds token ids outside the vocabulary "
                                      f"(0..{limit - 1})", "prompt")
                ids.append(prompt)
        return self._admit(request, ids, request.max_tokens, request.logprobs, client)

    async def admit_chat(self, request: ChatCompletionRequest, client: str = "") -> Admitted:
        self._refuse_bad(request, lambda: None)
        self._check_text([message.text() for message in request.messages], "messages")
        self._reserve(request.n, "n", client)
        try:
            text = chat_prompt(self.chat_template, self.model_path, request.conversation())
        except (RequestError, ValueError) as error:
            raise bad_request(str(error), "messages") from error
        # The template writes the special tokens itself: the tokenizer must not add more.
        ids = await self._encode(text, add_special_tokens=False)
        top = (request.top_logprobs or 0) if request.logprobs else None
        return self._admit(request, [ids], request.new_token_limit, top, client)

    def _refuse_bad(self, request, check: Callable):
        self.check_ready()
        self.check_model(request.model)
        try:
            request.refuse_unsupported()
            self._check_stop(request)
            return check()
        except BadField as error:
            raise bad_request(str(error), error.param) from error

    def _admit(self, request, prompts: list[list[int]], max_tokens: int | None,
               top_logprobs: int | None, client: str = "") -> Admitted:
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
        self.by_client[client].update(choice.request_id for choice in choices)
        return Admitted(choices, top_logprobs, n=request.n, client=client, arrived=now)

    # ------------------------------------------------------------ generation

    async def events(self, admitted: Admitted) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """The choices' token events as they come (interleaved when there are several).
        Leaving early aborts every choice still running."""
        choices = admitted.choices
        if len(choices) == 1:
            stream = self.engine.stream(choices[0].request_id)
            try:
                async for event in stream:
                    yield choices[0], self._count(choices[0], event)
            finally:  # closed now (aborting the request), not when collected
                await stream.aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            stream = self.engine.stream(choice.request_id)
            try:
                async for event in stream:
                    await queue.put((choice, event, None))
            except Exception as error:  # noqa: BLE001 - handed to the consumer
                await queue.put((choice, None, error))
            finally:  # closed now (aborting the request), not when collected
                await stream.aclose()

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

    def timed_events(self, admitted: Admitted) -> AsyncIterator[tuple[Choice, TokenEvent]]:
        """`events` under the server's clocks (deadlines.py)."""
        return timed_events(self, admitted)

    def _count(self, choice: Choice, event: TokenEvent) -> TokenEvent:
        now = time.perf_counter()
        if event.token_id is not None:
            choice.completion_tokens += 1
            self.metrics.generated_tokens.inc()
            if choice.last_token_at is None:
                choice.first_token_at = now
                self.metrics.ttft.observe(now - choice.arrived)
                waited = self.engine.queue_wait(choice.request_id)
                if waited is not None:
                    self.metrics.queue_wait.observe(waited)
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

    def done(self, admitted: Admitted) -> None:
        """The HTTP request is over: unfinished choices (a client gone) count as aborted, and
        the client's share of the queue is given back."""
        for choice in admitted.choices:
            if choice.finish_reason is None:
                choice.finish_reason = "abort"
                self.metrics.aborted.inc()
        mine = self.by_client.get(admitted.client)
        if mine is not None:
            mine.difference_update(choice.request_id for choice in admitted.choices)
            if not mine:
                del self.by_client[admitted.client]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

