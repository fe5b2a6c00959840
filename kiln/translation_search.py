"""The pieces of a translation: its results, one sentence's search (`OneBest` for
beam_size 1; `TranslationBeam`, the decoders' BeamSearch plus what translation adds), and the
token tables.

Both searches can keep each hypothesis' attention over the source (one row per target token,
from the alignment layer): for `return_attention` and for CTranslate2's coverage penalty,
score + beta * sum over source tokens of log(min(attention received, 1))."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import RequestError
from .generation.beam import BeamSearch
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
                 length_penalty, usable, callback, batch_id, vocabulary,
                 coverage_penalty: float = 0.0) -> None:
        self.request, self.sampling, self.generator = request, sampling, generator
        self.end_ids, self.return_end_token = end_ids, return_end_token
        self.processors, self.length_penalty, self.usable = processors, length_penalty, usable
        self.callback, self.batch_id, self.vocabulary = callback, batch_id, vocabulary
        self.coverage_penalty = coverage_penalty
        self.tokens: list[int] = []
        self.total, self.count = 0.0, 0
        self.trace: list[list[float]] | None = None  # attention rows, when kept

    def start_attention(self, rows: list[list[float]]) -> None:
        """The attention rows of the target prefix (attention is kept from now on)."""
        self.trace = list(rows)

    def advance(self, logits: torch.Tensor, attention: torch.Tensor | None = None):
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
            if self.trace is not None and attention is not None:
                self.trace.append(attention[0].tolist())
        if self.callback is not None:
            step = GenerationStepResult(step=self.count - 1, batch_id=self.batch_id,
                                        token_id=token, hypothesis_id=0,
                                        token=self.vocabulary.tokens.get(token),
                                        log_prob=log_prob, is_last=is_last)
            is_last = self.callback(step) is True or is_last
        return Decision(inputs=[token], finish_reason="stop" if is_last else None)

    def result(self) -> list[tuple[list[int], float, list | None]]:
        length = self.request.counted_prompt + self.count
        score = self.total / (length ** self.length_penalty) if length else -math.inf
        score += coverage(self.trace, self.coverage_penalty)
        return [(self.request.returned_prompt + self.tokens, score, self.trace)]


class TranslationBeam(BeamSearch):
    """The decoders' beam search with CTranslate2's translation options: attention kept per
    beam (return_attention, coverage_penalty), and `prefix_bias_beta`: while a beam still
    follows `bias_prefix`, its next-token distribution is (1 - beta) p + beta onehot(prefix
    token), so the prefix is preferred but not forced."""

    def __init__(self, *args, coverage_penalty: float = 0.0, bias_beta: float = 0.0,
                 bias_prefix: Sequence[int] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.coverage_penalty = coverage_penalty
        self.bias_beta, self.bias_prefix = bias_beta, list(bias_prefix)
        self.diverged = [False] * self.beam.beam_size  # CTranslate2's flags, by beam position
        self.traces: list[list[list[float]]] | None = None
        self.finished_traces: list[list[list[float]]] = []
        self.rows_attention: list[list[float]] | None = None

    def start_attention(self, rows: list[list[float]]) -> None:
        self.traces = [list(rows) for _ in range(self.beam.beam_size)]

    def advance(self, logits: torch.Tensor, attention: torch.Tensor | None = None):
        keep = self.traces is not None and attention is not None
        self.rows_attention = attention.tolist() if keep else None
        decision = super().advance(logits)
        if keep and decision.sources is not None:
            self.traces = [self.traces[origin] + [self.rows_attention[origin]]
                           for origin in decision.sources]
        return decision

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        plain = logits.log_softmax(dim=-1)
        if not self.bias_beta or self.step >= len(self.bias_prefix):
            return plain
        beta = self.bias_beta
        biased = logits.softmax(dim=-1) * (1 - beta)
        biased[:, self.bias_prefix[self.step]] += beta
        following = torch.tensor([not flag for flag in self.diverged[:logits.shape[0]]],
                                 device=logits.device)
        return torch.where(following[:, None], biased.log(), plain)

    def _registered(self, origin: int, hidden: bool) -> None:
        if self.rows_attention is not None:  # the beam's rows, plus its last one if shown
            own = [] if hidden else [self.rows_attention[origin]]
            self.finished_traces.append(self.traces[origin] + own)

    def _register(self, words: list[int], origins: list[int], scores: list[float]) -> list[int]:
        width = self.beam.beam_size
        if self.bias_beta:  # as CTranslate2: by candidate position, not by origin beam
            prefix, step = self.bias_prefix, self.step
            self.diverged = [step >= len(prefix) or self.diverged[k] or words[k] != prefix[step]
                             for k in range(width)]
        chosen = super()._register(words, origins, scores)
        if self.coverage_penalty and not self.step + 1 >= self.request.max_new_tokens:
            self.done = len(self.hypotheses) >= self.beam.max_candidates  # no early exit
        return chosen

    def _bonus(self, index: int) -> float:
        trace = self.finished_traces[index] if self.finished_traces else None
        return coverage(trace, self.coverage_penalty)

    def result(self) -> list[tuple[list[int], float, list | None]]:
        return [(self.hypotheses[index][0], score,
                 self.finished_traces[index] if self.finished_traces else None)
                for index, score in self.ranked()]


def coverage(trace: list[list[float]] | None, beta: float) -> float:
    """CTranslate2's coverage penalty of one hypothesis (0 without attention or beta)."""
    if not beta or not trace:
        return 0.0
    received = torch.tensor(trace).sum(dim=0)
    kept = received[received > 0]
    return beta * float(kept.clamp(max=1.0).log().sum())


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
