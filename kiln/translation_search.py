"""The pieces of a translation: its results, one sentence's search when beam_size is 1
(`OneBest`; wider beams use the decoders' BeamSearch), and the token tables."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import RequestError
from .generation.requests import Request
from .generation.results import GenerationStepResult
from .generation.sampling import choose_tokens
from .generation.search import Decision


@dataclass
class TranslationResult:
    """As CTranslate2's: hypotheses (token strings, best first) and, with return_scores,
    their scores."""

    hypotheses: list[list[str]]
    scores: list[float] = field(default_factory=list)
    attention: list = field(default_factory=list)


@dataclass
class ScoringResult:
    tokens: list[str]
    log_probs: list[float]


@dataclass
class Job:
    """One source sentence being translated."""

    index: int
    source: list[int]
    request: Request
    search: object  # BeamSearch or OneBest


class OneBest:
    """beam_size 1: one token per step, greedy or drawn (top-k, temperature, top-p), with the
    decoders' processors and min-length rule; `callback` sees each token (True stops). The
    score divides the log-probs by length ** length_penalty, the end token counted."""

    def __init__(self, request, sampling, generator, end_ids, return_end_token, processors,
                 length_penalty, usable, callback, batch_id, vocabulary) -> None:
        self.request, self.sampling, self.generator = request, sampling, generator
        self.end_ids, self.return_end_token = end_ids, return_end_token
        self.processors, self.length_penalty, self.usable = processors, length_penalty, usable
        self.callback, self.batch_id, self.vocabulary = callback, batch_id, vocabulary
        self.tokens: list[int] = []
        self.total, self.count = 0.0, 0

    def advance(self, logits: torch.Tensor):
        request = self.request
        if self.processors.active:
            logits = self.processors.apply(logits, [request.returned_prompt + self.tokens])
        if self.count < request.min_new_tokens and self.end_ids:
            logits[:, sorted(self.end_ids)] = float("-inf")
        ids, log_probs = choose_tokens(logits, [(self.sampling, self.generator)], self.usable)
        token, log_prob = int(ids[0]), float(log_probs[0])
        self.total, self.count = self.total + log_prob, self.count + 1
        is_end = token in self.end_ids
        is_last = is_end or self.count >= request.max_new_tokens
        if not is_end or self.return_end_token:
            self.tokens.append(token)
        if self.callback is not None:
            step = GenerationStepResult(step=self.count - 1, batch_id=self.batch_id,
                                        token_id=token, hypothesis_id=0,
                                        token=self.vocabulary.tokens.get(token),
                                        log_prob=log_prob, is_last=is_last)
            is_last = self.callback(step) is True or is_last
        return Decision(inputs=[token], finish_reason="stop" if is_last else None)

    def result(self) -> list[tuple[list[int], float]]:
        length = len(self.request.returned_prompt) + self.count
        score = self.total / (length ** self.length_penalty) if length else -math.inf
        return [(self.request.returned_prompt + self.tokens, score)]


class Vocabulary:
    """Token strings <-> ids, from the folder's tokenizer.json or vocab.json (or a list)."""

    def __init__(self, folder: Path | None = None, tokens: list[str] | None = None) -> None:
        mapping: dict[str, int] = {}
        if tokens is not None:
            mapping = {token: index for index, token in enumerate(tokens)}
        elif (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            mapping = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(
                with_added_tokens=True)
        elif (folder / "vocab.json").is_file():
            mapping = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        else:
            raise FileNotFoundError(f"{folder} has neither tokenizer.json nor vocab.json: kiln "
                                    "needs the token strings of the model's vocabulary")
        self.ids = mapping
        self.tokens = {token_id: token for token, token_id in mapping.items()}

    def to_ids(self, tokens: Sequence[str | int], what: str) -> list[int]:
        if all(isinstance(token, int) and not isinstance(token, bool) for token in tokens):
            return list(tokens)
        if not all(isinstance(token, str) for token in tokens):
            raise TypeError(f"{what} must hold token strings or ids, not a mix")
        unknown = [token for token in tokens if token not in self.ids]
        if unknown:
            raise RequestError(f"{what}: tokens not in the vocabulary: {unknown[:5]}; tokenize "
                               "with the model's own tokenizer")
        return [self.ids[token] for token in tokens]

    def to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens.get(token_id, "") for token_id in ids]
