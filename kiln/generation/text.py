"""The text API that Generator exposes (generate, stream, chat) on top of the token API:
prompts encoded, continuations decoded and cut before stop strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..errors import RequestError
from .chat import ChatTemplate, Message
from .options import GenerationOptions, split_options
from .token_api import generate_batch
from .tokenizer import Tokenizer


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
    ids = encode_prompts(tokenizer, text)
    options, call = split_options(max_length=max_length,
                                  include_prompt_in_result=include_prompt_in_result, **options)
    stops = options.stop_strings
    results = generate_batch(engine, ids, options, call, text_streams=bool(stops),
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
