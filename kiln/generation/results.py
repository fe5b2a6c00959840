"""What generation returns, with CTranslate2's names: results, step results, scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GenerationResult:
    """One prompt's result, as CTranslate2's `GenerationResult`."""

    sequences: list[list[str]]
    sequences_ids: list[list[int]]
    scores: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per hypothesis: [steps, vocab]


class AsyncGenerationResult:
    """A result still being computed (generate_batch(..., asynchronous=True))."""

    def __init__(self, future, index: int) -> None:
        self._future, self._index = future, index

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> GenerationResult:
        """Wait for the result; an error in generation is raised here."""
        return self._future.result()[self._index]


@dataclass
class ScoringResult:
    """Per-token log-probabilities of tokens[1:], as CTranslate2's `ScoringResult`;
    `truncated` says the input was cut to max_input_length."""

    tokens: list[str]
    log_probs: list[float]
    truncated: bool = False


@dataclass
class GenerationStepResult:
    """One generated token, as CTranslate2's `GenerationStepResult`."""

    step: int
    batch_id: int
    token_id: int
    hypothesis_id: int
    token: str | None
    log_prob: float
    is_last: bool
