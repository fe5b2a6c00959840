"""Requests: prompts checked against the model, turned into what the engine runs.

A `Request` is one prompt after validation: the ids to run (a static prompt first, if any),
how many tokens it may generate, and which part of the prompt its result returns. The
`RequestBuilder` does every id, length and end-token check, so a bad request fails here,
before any compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import RequestError
from ..model.spec import ModelSpec, TokenIds
from .options import GenerationOptions
from .processors import Processors


@dataclass
class Request:
    prompt_ids: list[int]  # what runs: the static prompt (if any), then the prompt
    max_new_tokens: int
    min_new_tokens: int
    returned_prompt: list[int]  # prompt part of the result (empty unless include_prompt)
    counted_prompt: int  # prompt tokens counted in max_length and in the score's length
    static_length: int = 0  # leading prompt_ids that are the (shared) static prompt

    @property
    def history_prefix(self) -> list[int]:
        """The prompt tokens that logits processors see before the generated ones: CTranslate2's
        alive_seq for the prompt run alone, i.e. the prompt after its first (start) token when
        it is part of the result, else none; never the static prompt. (CTranslate2 run on a
        batch of prompts of different lengths with include_prompt_in_result=False also puts a
        longer prompt's tokens past the shortest prompt's length minus one there; kiln keeps
        each row independent of the batch.)"""
        return self.prompt_ids[len(self.prompt_ids) - self.counted_prompt:]

    @property
    def total_length(self) -> int:
        """Cache positions the request may fill: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class RowState:
    """A row's generated tokens and the log-probs behind its score."""

    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)  # of each chosen token (end included)
    logits: list[torch.Tensor] = field(default_factory=list)  # kept for return_logits_vocab
    log_prob_sum: float = 0.0
    scored: int = 0  # decoded length the score is normalised by
    length_penalty: float = 1.0
    done: bool = False

    def add(self, token: int, log_prob: float, is_end: bool, return_end_token: bool,
            at_limit: bool) -> None:
        self.log_prob_sum += log_prob
        self.log_probs.append(log_prob)
        self.scored += 1  # the end token counts in the score even when not returned
        if not is_end or return_end_token:
            self.tokens.append(token)
        self.done = is_end or at_limit

    def truncate(self, count: int) -> None:
        """Keep the first `count` tokens only (a callback stopped the row there)."""
        extra = len(self.log_probs) - count
        if extra > 0:
            self.log_prob_sum = 0.0
            for log_prob in self.log_probs[:count]:
                self.log_prob_sum += log_prob
            self.scored -= extra
            del self.tokens[count:], self.log_probs[count:], self.logits[count:]

    @property
    def score(self) -> float:
        """CTranslate2's score: the log-prob sum over the decoded length to the power of the
        length penalty (prompt tokens that count in max_length add 0 to the sum but count in
        the length)."""
        return self.log_prob_sum / max(1, self.scored) ** self.length_penalty


class RequestBuilder:
    """Checks prompts and options against a model's vocabulary and context."""

    def __init__(self, spec: ModelSpec, tokens: TokenIds, vocabulary, source: str) -> None:
        self.spec, self.tokens, self.vocabulary, self.source = spec, tokens, vocabulary, source

    def check_batch(self, start_tokens: Sequence[Sequence[str | int]]) -> list[list[int]]:
        if isinstance(start_tokens, str) or not isinstance(start_tokens, Sequence):
            raise TypeError("start_tokens must be a list of prompts, each a list of token "
                            "strings or ids")
        if len(start_tokens) == 0:
            raise RequestError("the batch is empty; give at least one prompt")
        return [self.to_ids(prompt, index) for index, prompt in enumerate(start_tokens)]

    def to_ids(self, prompt: Sequence[str | int], index: int) -> list[int]:
        if isinstance(prompt, str) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompt {index} must be a list of token strings or ids, got "
                            f"{type(prompt).__name__}")
        if len(prompt) == 0:
            raise RequestError(f"prompt {index} is empty; give at least one token")
        if all(isinstance(token, str) for token in prompt):
            return self.require_vocabulary().tokens_to_ids(prompt)
        if not all(isinstance(token, int) and not isinstance(token, bool) for token in prompt):
            raise TypeError(f"prompt {index} mixes types; give all token strings or all ints")
        bad = [token for token in prompt if not 0 <= token < self.spec.vocab_size]
        if bad:
            raise RequestError(f"prompt {index} has token ids outside the vocabulary "
                               f"[0, {self.spec.vocab_size}): {bad[:5]}")
        return list(prompt)

    def require_vocabulary(self):
        if self.vocabulary is None:
            raise RequestError(f"{self.source} has no tokenizer.json or vocabulary.json, so "
                               "token strings cannot be mapped; pass token ids instead")
        return self.vocabulary

    def end_ids(self, end_token) -> frozenset[int]:
        if end_token is None:
            return frozenset(self.tokens.eos)
        tokens = [end_token] if isinstance(end_token, (str, int)) else list(end_token)
        ids = set()
        for token in tokens:
            if isinstance(token, str):
                ids.update(self.require_vocabulary().tokens_to_ids([token]))
            elif isinstance(token, int) and 0 <= token < self.spec.vocab_size:
                ids.add(token)
            else:
                raise RequestError(f"end_token {token!r} is neither a token string nor an id in "
                                   f"[0, {self.spec.vocab_size})")
        return frozenset(ids)

    def processors(self, options: GenerationOptions) -> Processors:
        suppressed_ids, sequences = [], []
        if options.disable_unk:
            if self.tokens.unk is None:
                raise RequestError("disable_unk=True but this model has no unknown token")
            suppressed_ids.append(self.tokens.unk)
        for index, sequence in enumerate(options.suppress_sequences or []):
            ids = self.to_ids(sequence, index)
            if len(ids) == 1:
                suppressed_ids.append(ids[0])
            else:
                sequences.append(tuple(ids))
        return Processors(options.repetition_penalty, options.no_repeat_ngram_size,
                          tuple(suppressed_ids), tuple(sequences))

    def static_ids(self, options: GenerationOptions) -> list[int] | None:
        return None if options.static_prompt is None else self.to_ids(options.static_prompt, 0)

    def request(self, user_prompt: list[int], options: GenerationOptions,
                static: list[int] | None = None, max_positions: int | None = None) -> Request:
        """A validated request; a static prompt runs before the prompt but, as in CTranslate2,
        is neither returned nor counted in max_length. `max_positions` is the engine's slot
        length when it is below the model's context."""
        static = static or []
        prompt = static + user_prompt
        # CTranslate2 feeds the first prompt token as the start token: the rest counts.
        counted_prompt = len(user_prompt) - 1 if options.include_prompt_in_result else 0
        max_new = options.max_length - counted_prompt
        if max_new <= 0:
            raise RequestError(
                f"max_length={options.max_length} leaves no room to generate: with "
                f"include_prompt_in_result=True it counts the prompt's {len(user_prompt)} tokens "
                "(all but the first); raise max_length or set include_prompt_in_result=False")
        self.check_fits(len(prompt), max_new, max_positions)
        returned = self.returned_prompt(user_prompt) if options.include_prompt_in_result else []
        return Request(prompt, max_new, max(0, options.min_length - counted_prompt), returned,
                       counted_prompt, len(static))

    def returned_prompt(self, user_prompt: list[int]) -> list[int]:
        """The prompt as a result returns it: without a leading BOS (CTranslate2)."""
        bos = self.tokens.bos
        return user_prompt[1:] if bos is not None and user_prompt[0] == bos else list(user_prompt)

    def check_fits(self, prompt_length: int, max_new: int, max_positions: int | None) -> None:
        context = self.spec.max_position_embeddings
        if prompt_length + max_new > context:
            raise RequestError(
                f"the prompt ({prompt_length} tokens) plus up to {max_new} new tokens exceeds the "
                f"model's context of {context} positions; shorten the prompt or lower max_length")
        if max_positions is not None and prompt_length + max_new > max_positions:
            raise RequestError(
                f"the prompt ({prompt_length} tokens) plus up to {max_new} new tokens exceeds the "
                f"engine's {max_positions} positions per sequence (its max_length); shorten the "
                "prompt, lower max_length or start the engine with a larger max_length")
