"""Beam search with CTranslate2's rules, one request at a time on the engine's slot cache.

A request gets `beam_size` cache slots. The prompt is prefilled into the first; after each
step the engine reorders the slots by copying (no recomputation), as `Decision.sources`
says. Per step, the 2 x beam_size best continuations are taken over all beams; a finished
one (end token, or the last step) is registered as a hypothesis and replaced by the next
unfinished candidate. Search ends with the top beam finished and num_hypotheses found
(length_penalty 0), or with round(beam_size x patience) hypotheses; scores are divided by
length ** length_penalty.
"""

from __future__ import annotations

import math

import torch

from .options import BeamOptions
from .processors import Processors
from .sampling import SamplingParams, sampling_probabilities
from .search import Decision, Search

FORCED_OUT = -1e10  # CTranslate2's score for an end token in a secondary first-step beam


class BeamSearch(Search):
    """The search of one beam-search request."""

    def __init__(self, request, beam: BeamOptions, sampling: SamplingParams,
                 generator: torch.Generator, end_ids: frozenset[int], return_end_token: bool,
                 processors: Processors, usable_vocab_size: int) -> None:
        self.request, self.beam, self.sampling, self.generator = request, beam, sampling, generator
        self.end_ids, self.return_end_token = end_ids, return_end_token
        self.processors, self.usable = processors, usable_vocab_size
        self.rows = beam.beam_size
        self.alive: list[list[int]] = [[] for _ in range(beam.beam_size)]
        self.hypotheses: list[tuple[list[int], float, int]] = []  # tokens, score, length
        self.top_finished = False
        self.done = False
        self.step = 0
        self.scores: torch.Tensor | None = None  # [beam_size] cumulative log-probs

    def advance(self, logits: torch.Tensor):
        """Logits [1, V] after the prompt, then [beam_size, V] of the beams."""
        request, width, expanded = self.request, self.beam.beam_size, self.step > 0
        if self.processors.active:
            histories = [request.history_prefix + tokens
                         for tokens in (self.alive if expanded else self.alive[:1])]
            logits = self.processors.apply(logits, histories)
        if self.end_ids and self.step < request.min_new_tokens:
            logits[:, sorted(self.end_ids)] = float("-inf")
        log_probs = self._log_probs(logits)
        vocab = log_probs.shape[-1]
        if self.usable < vocab:  # padding rows of the embedding are never candidates
            log_probs[:, self.usable:] = float("-inf")
        candidates = (log_probs + self.scores.unsqueeze(-1)).view(1, -1) if expanded else log_probs
        top_scores, top_ids = self._candidates(candidates, 2 * width)
        origins, words = (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
        top_scores = top_scores.tolist()
        if self.step == 0 and request.counted_prompt > 0:
            for j in range(1, len(words)):  # CTranslate2's first free step after a prefix
                if words[j] in self.end_ids:
                    top_scores[j] = FORCED_OUT
        chosen = self._register(words, origins, top_scores)
        self.step += 1
        if self.done:
            return Decision(finish_reason="length")
        self.alive = [self.alive[origins[j]] + [words[j]] for j in chosen]
        self.scores = torch.tensor([top_scores[j] for j in chosen], device=logits.device)
        return Decision(inputs=[words[j] for j in chosen], sources=[origins[j] for j in chosen])

    def _log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Each beam's next-token log-probabilities (translation's biased search changes
        them)."""
        return logits.log_softmax(dim=-1)

    def _candidates(self, candidates: torch.Tensor, count: int):
        """The `count` continuations to consider, best first: the top ones, or with sampling a
        draw without replacement (top-k, then temperature, then top-p over all beams' options)."""
        count = min(count, candidates.shape[-1])
        if self.sampling.greedy:
            scores, ids = candidates.topk(count, dim=-1)
            return scores[0], ids[0]
        probs = sampling_probabilities(candidates, self.sampling)
        drawn = torch.multinomial(probs, count, replacement=False, generator=self.generator)
        scores = candidates.gather(-1, drawn)
        order = scores.argsort(dim=-1, descending=True)
        return scores.gather(-1, order)[0], drawn.gather(-1, order)[0]

    def _register(self, words: list[int], origins: list[int], scores: list[float]) -> list[int]:
        """Register finished candidates among the first beam_size; return the candidate index
        each beam continues with."""
        width, request = self.beam.beam_size, self.request
        is_last = self.step + 1 >= request.max_new_tokens
        chosen, secondary = [], width
        for k in range(width):
            pick = k
            if words[k] in self.end_ids or is_last:
                if k == 0:
                    self.top_finished = True
                hidden = words[k] in self.end_ids and not self.return_end_token
                tokens = self.alive[origins[k]] + ([] if hidden else [words[k]])
                # The length that normalises the score counts the end token even when hidden.
                length = request.counted_prompt + len(self.alive[origins[k]]) + 1
                self.hypotheses.append((tokens, scores[k], length))
                self._registered(origins[k], hidden)
                for j in range(secondary, len(words)):
                    if words[j] not in self.end_ids:
                        pick, secondary = j, j + 1
                        break
            chosen.append(pick)
        if is_last:
            self.done = True
        elif self.beam.length_penalty == 0:
            self.done = self.top_finished and len(self.hypotheses) >= self.beam.num_hypotheses
        else:
            self.done = len(self.hypotheses) >= self.beam.max_candidates
        return chosen

    def _registered(self, origin: int, hidden: bool) -> None:
        """A hypothesis was just registered from beam `origin` (its last token hidden or
        not): translation keeps its attention here (translation_search.TranslationBeam)."""

    def ranked(self) -> list[tuple[int, float]]:
        """(index into self.hypotheses, final score) of the best, best first: scores divided
        by length ** length_penalty, plus `_bonus`."""
        finals = []
        for index, (_, score, length) in enumerate(self.hypotheses):
            penalty = self.beam.length_penalty
            divisor = length ** penalty if length or penalty == 0 else 0
            final = score / divisor if divisor else -math.inf
            finals.append((index, final + self._bonus(index)))
        finals.sort(key=lambda pair: pair[1], reverse=True)
        return finals[: self.beam.num_hypotheses]

    def _bonus(self, index: int) -> float:  # noqa: ARG002 - translation's coverage penalty
        return 0.0

    def result(self) -> list[tuple[list[int], float]]:
        """The best hypotheses (tokens, score), best first."""
        return [(self.hypotheses[index][0], score) for index, score in self.ranked()]
