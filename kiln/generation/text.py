"""Text on top of tokens: encoding prompts, streaming decoded text with stop strings, and
the text API (generate, stream, chat) that Generator exposes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..errors import RequestError
from .chat import ChatTemplate, Message
from .options import GenerationOptions
from .tokenizer import StreamingDetokenizer, Tokenizer


class TextStream:
    """A request's continuation as text: decoded as tokens come, never split inside a UTF-8
    character, and cut before the first stop string. Text that could still turn out to be
    the start of a stop string is held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer, context_ids: Sequence[int],
                 stops: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.detokenizer = StreamingDetokenizer(tokenizer, context_ids, skip_special_tokens)
        self.stops = tuple(stops)
        self.text = ""  # the decoded continuation so far
        self.released = 0  # characters of it already given out
        self.stopped = False

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
        rest = self.text[self.released:]
        self.released = len(self.text)
        return tail + rest

    def _extend(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        searched_from = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        cut = min((i for i in (self.text.find(s, searched_from) for s in self.stops) if i >= 0),
                  default=-1)
        end = cut if cut >= 0 else len(self.text) - self._held_back()
        self.stopped = cut >= 0
        released = self.text[self.released:end] if end > self.released else ""
        self.released = max(self.released, end)
        return released

    def _held_back(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        for size in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1),
                          0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0


def encode_prompts(tokenizer: Tokenizer, text: str | Sequence[str],
                   add_special_tokens: bool = True) -> list[list[int]]:
    prompts = [text] if isinstance(text, str) else list(text)
    if not prompts:
        raise RequestError("the batch is empty; give at least one prompt")
    ids = [tokenizer.encode(prompt, add_special_tokens=add_special_tokens) for prompt in prompts]
    empty = [index for index, prompt_ids in enumerate(ids) if not prompt_ids]
    if empty:
        raise RequestError(f"prompt {empty[0]} encodes to no tokens; give some text")
    return ids


def generate_text(engine, tokenizer: Tokenizer, text: str | Sequence[str], max_length: int,
                  include_prompt_in_result: bool, skip_special_tokens: bool,
                  options: dict) -> str | list[str]:
    """Generator.generate: a str gives a str, a list gives a list. With stop strings each
    continuation ends at the first one (even across tokens) and the text is cut before it."""
    from .token_api import generate_batch

    ids = encode_prompts(tokenizer, text)
    options = GenerationOptions.from_kwargs(max_length=max_length,
                                            include_prompt_in_result=include_prompt_in_result,
                                            **options)
    stops = options.stop_strings
    results = generate_batch(engine, ids, options, text_streams=bool(stops),
                             skip_special_tokens=skip_special_tokens)
    texts = []
    for prompt_ids, result in zip(ids, results, strict=True):
        full = tokenizer.decode(result.sequences_ids[0], skip_special_tokens)
        if stops:  # cut the continuation (not a returned prompt) before its first stop string
            start = 0
            if include_prompt_in_result:
                returned = engine.builder.returned_prompt(prompt_ids)
                start = len(tokenizer.decode(returned, skip_special_tokens))
            cut = min((i for i in (full.find(s, start) for s in stops) if i >= 0), default=len(full))
            full = full[:cut]
        texts.append(full)
    return texts[0] if isinstance(text, str) else texts


def stream_text(engine, tokenizer: Tokenizer, text: str, max_length: int,
                skip_special_tokens: bool = True, add_special_tokens: bool = True,
                **options) -> Iterator[str]:
    """The continuation of `text` as text pieces, as soon as they are whole characters (and
    not possibly the start of a stop string). Joined, the pieces equal the decoded
    continuation, cut before a stop string."""
    prompt_ids = encode_prompts(tokenizer, text, add_special_tokens)[0]
    options = GenerationOptions.from_kwargs(max_length=max_length,
                                            include_prompt_in_result=False, **options)
    request_id = engine.add_request(prompt_ids, options, text=True,
                                    skip_special_tokens=skip_special_tokens)
    for event in engine.stream(request_id):
        if event.text:
            yield event.text


def chat_prompt(template: ChatTemplate | None, source, messages: str | list[Message]) -> str:
    if template is None:
        raise RequestError(f"{source} has no chat template (tokenizer_config.json "
                           "'chat_template'); use generate() for plain text continuation")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return template.render(messages, add_generation_prompt=True)
