"""Choosing the next token, in CTranslate2's order: top-k, then temperature, then top-p.

`sampling_topk=1` is greedy; `sampling_topk=0` samples the full distribution. Sampling draws
with the exponential-race trick (argmax of p / Exp(1)), which needs no device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this, sampling is greedy: it is the limit as the temperature goes to 0, and dividing
# logits by a smaller temperature could overflow float32 (inf - inf makes NaN probabilities).
GREEDY_BELOW_TEMPERATURE = 1e-30


@dataclass(frozen=True)
class SamplingParams:
    topk: int = 1
    topp: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.topk, int) or isinstance(self.topk, bool) or self.topk < 0:
            raise ValueError(f"sampling_topk must be an int >= 0 (0: full distribution, "
                             f"1: greedy), got {self.topk!r}")
        if not 0.0 < self.topp <= 1.0:
            raise ValueError(f"sampling_topp must be in (0, 1], got {self.topp!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"sampling_temperature must be >= 0 (0: greedy), got "
                             f"{self.temperature!r}")

    @property
    def greedy(self) -> bool:
        return self.topk == 1 or self.temperature < GREEDY_BELOW_TEMPERATURE


def _filter_top_p(logits: torch.Tensor, topp: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches topp."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = before >= topp  # the most likely token always stays (before == 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampled from: top-k, then temperature, then top-p, then softmax."""
    if 0 < params.topk < logits.shape[-1]:
        kth = logits.topk(params.topk, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = logits / params.temperature
    if params.topp < 1.0:
        logits = _filter_top_p(logits, params.topp)
    return logits.softmax(dim=-1)


def choose_tokens(logits: torch.Tensor,
                  choices: list[tuple[SamplingParams, torch.Generator | None]],
                  usable_vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of float32 logits [B, V], each row with its own sampling
    parameters and random stream; return (ids, log-probs under the model).

    Rows never influence each other: a row's token is the same whatever rows share the call.
    Ids >= `usable_vocab_size` (padding rows of the embedding, which no tokenizer produces)
    are never picked. The log-prob is of the model's whole distribution, before that mask
    and before top-k/temperature/top-p, which is what CTranslate2 reports in `scores`.
    """
    log_probs = logits.log_softmax(dim=-1)
    if usable_vocab_size is not None and usable_vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, usable_vocab_size:] = float("-inf")
    ids = logits.max(dim=-1).indices  # the first maximum, as argmax, at a third of its cost
    sampled: dict[SamplingParams, list[int]] = {}
    for row, (params, _) in enumerate(choices):
        if not params.greedy:
            sampled.setdefault(params, []).append(row)
    for params, rows in sampled.items():
        probs = sampling_probabilities(logits[rows], params)
        noise = torch.stack([torch.empty_like(probs[0]).exponential_(1.0, generator=choices[row][1])
                             for row in rows])
        ids[rows] = (probs / noise).argmax(dim=-1)
    return ids, log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
