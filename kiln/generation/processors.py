"""Logits processors with CTranslate2's semantics, applied before the log-softmax (so scores
reflect them) and before sampling.

Each row's history is what CTranslate2 decodes for it: the generated tokens, preceded by the
prompt after its first token when the prompt is part of the result (include_prompt_in_result).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def mask_early_end(logits: torch.Tensor, end_ids: torch.Tensor, min_new: torch.Tensor,
                   step: int, longest_min: int) -> torch.Tensor:
    """No end token before min_length: rows whose `min_new` (new tokens required, one value
    per row) exceeds `step` get -inf at the end ids. Device ops only, no host sync; nothing
    at all once `step` passes `longest_min`, the largest min_new (known on the host)."""
    if end_ids.numel() and step < longest_min:
        early = (step < min_new).unsqueeze(1)
        logits[:, end_ids] = logits[:, end_ids].masked_fill(early, float("-inf"))
    return logits


@dataclass(frozen=True)
class Processors:
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    suppressed_ids: tuple[int, ...] = ()  # never generated (disable_unk, one-token sequences)
    suppressed_sequences: tuple[tuple[int, ...], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty!r}")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be an int >= 0 (0: off), got "
                             f"{self.no_repeat_ngram_size!r}")

    @property
    def active(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0
                or bool(self.suppressed_ids) or bool(self.suppressed_sequences))

    def apply(self, logits: torch.Tensor, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Processed copy of float32 logits [B, V], one history per row."""
        logits = logits.clone()
        if self.suppressed_ids:
            logits[:, list(self.suppressed_ids)] = float("-inf")
        for row, history in enumerate(histories):
            banned = set(self._banned_by_sequences(history))
            banned |= self._banned_by_ngrams(history)
            if self.repetition_penalty != 1.0 and history:
                seen = torch.tensor(sorted(set(history)), device=logits.device)
                values = logits[row, seen]
                logits[row, seen] = torch.where(values < 0, values * self.repetition_penalty,
                                                values / self.repetition_penalty)
            if banned:
                logits[row, sorted(banned)] = float("-inf")
        return logits

    def _banned_by_sequences(self, history: Sequence[int]):
        for sequence in self.suppressed_sequences:
            prefix = sequence[:-1]
            if len(history) >= len(prefix) and tuple(history[len(history) - len(prefix):]) == prefix:
                yield sequence[-1]

    def _banned_by_ngrams(self, history: Sequence[int]) -> set[int]:
        size = self.no_repeat_ngram_size
        if size <= 0 or len(history) < size - 1:
            return set()
        if size == 1:
            return set(history)
        prefix = tuple(history[len(history) - size + 1:])
        return {history[i + size - 1] for i in range(len(history) - size + 1)
                if tuple(history[i:i + size - 1]) == prefix}
