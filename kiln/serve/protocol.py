"""The OpenAI request bodies kiln serves, as Pydantic models, and how each becomes engine
options. Fields kiln cannot honour are refused with a 400 naming them, never ignored: an
unknown field is refused unless it is in IGNORED_FIELDS, the OpenAI fields that do not change
what is generated (kiln accepts them and ignores them on purpose)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_COMPLETION_LOGPROBS = 5  # as the OpenAI API
MAX_TOP_LOGPROBS = 20
SEED_RANGE = 2**63


class BadField(ValueError):
    """A field kiln cannot honour: a 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# Accepted and ignored on purpose: bookkeeping that does not change the output.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier", "parallel_tool_calls"})
IGNORED_MESSAGE_FIELDS = frozenset({"refusal", "annotations"})


class UnknownField(ValueError):
    """A field kiln does not know: a 400 naming it (see IGNORED_FIELDS)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _refuse_unknown(model: type[BaseModel], data, ignored: frozenset[str], where: str):
    if isinstance(data, dict):
        for name in data:
            if name not in model.model_fields and name not in ignored:
                raise UnknownField(str(name), f"unknown field {name!r}{where}: kiln does not "
                                   "support it and will not ignore it silently; remove it")
    return data


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    # Unknown fields are refused (below), except the ones ignored on purpose.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # extension: -1 or 0 is the whole distribution
    min_tokens: int | None = Field(None, ge=0)  # extension: end tokens are barred until then
    repetition_penalty: float | None = Field(None, gt=0.0)  # extension (CTranslate2's)
    prompt_lookup: bool | None = None  # extension: speculative decoding from the text itself
    num_speculative_tokens: int | None = Field(None, ge=1, le=32)  # extension
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data):
        return _refuse_unknown(cls, data, IGNORED_FIELDS, "")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if not all(stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops or None

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise BadField(name, f"{name} is not supported by kiln; use repetition_penalty "
                                     "(e.g. 1.1) instead")
        if self.logit_bias:
            raise BadField("logit_bias", "logit_bias is not supported by kiln")
        if self.stream_options is not None and not self.stream:
            raise BadField("stream_options", "stream_options needs stream: true")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def engine_options(self, max_new_tokens: int, top_logprobs: int) -> dict[str, Any]:
        """GenerationOptions for one choice (the seed is set per choice by the caller)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        options: dict[str, Any] = dict(max_length=max_new_tokens, include_prompt_in_result=False,
                                       top_logprobs=top_logprobs)
        if temperature == 0.0 or self.top_k == 1:
            options["sampling_topk"] = 1
        else:
            options.update(sampling_topk=max(self.top_k or 0, 0), sampling_temperature=temperature,
                           sampling_topp=1.0 if self.top_p is None else self.top_p)
        if self.min_tokens:
            options["min_length"] = min(self.min_tokens, max_new_tokens)
        if self.repetition_penalty is not None:
            options["repetition_penalty"] = self.repetition_penalty
        if self.stop:
            options["stop"] = list(self.stop)
        if self.prompt_lookup is not None:
            options["prompt_lookup"] = self.prompt_lookup
        if self.num_speculative_tokens is not None:
            options["num_speculative_tokens"] = self.num_speculative_tokens
        return options

    def choice_seed(self, index: int) -> int | None:
        """Each of the n choices gets its own stream, all reproducible from `seed`."""
        if self.seed is None:
            return None
        from ..generation.engine import row_seed

        return row_seed(self.seed % SEED_RANGE, index)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise BadField("echo", "echo is not supported by kiln")
        if self.suffix:
            raise BadField("suffix", "suffix (insertion) is not supported by kiln")
        if self.best_of is not None and self.best_of != self.n:
            raise BadField("best_of", "best_of is not supported by kiln; use n")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise BadField("prompt", "prompt is empty")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        if all(isinstance(item, str) for item in prompt):
            return list(prompt)
        if all(isinstance(item, list) and item for item in prompt):
            return [list(item) for item in prompt]
        raise BadField("prompt", "prompt must be a string, a list of strings, a list of token "
                                 "ids or a list of lists of token ids (none empty)")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data):
        return _refuse_unknown(cls, data, IGNORED_MESSAGE_FIELDS, " in a message")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise BadField("tools", "tool calls are not supported by kiln")
        if self.tool_choice not in (None, "none"):
            raise BadField("tool_choice", "tool calls are not supported by kiln")
        if self.response_format and self.response_format.get("type") != "text":
            raise BadField("response_format", "only response_format {'type': 'text'} is "
                                              "supported by kiln")
        if self.top_logprobs and not self.logprobs:
            raise BadField("top_logprobs", "top_logprobs needs logprobs: true")

    @property
    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is the newer name of "system"; chat templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]
