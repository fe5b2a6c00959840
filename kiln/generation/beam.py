"""Beam search with CTranslate2's rules, on kiln's slot KV cache.

Each prompt gets `beam_size` cache slots. The prompt is prefilled once and its slot copied to
the others; after each step, slots are reordered by copying (no recomputation). Per step, the
2 x beam_size best continuations are taken over all beams; a finished one (end token, or the
last step) is registered as a hypothesis and replaced by the next unfinished candidate.
Search ends with the top beam finished and num_hypotheses found (length_penalty 0), or with
round(beam_size x patience) hypotheses; scores are divided by length ** length_penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .processors import mask_early_end
from .sampling import sampling_probabilities

FORCED_OUT = -1e10  # CTranslate2's score for an end token in a secondary first-step beam


@dataclass
class BeamOptions:
    beam_size: int
    patience: float = 1.0
    num_hypotheses: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.beam_size, int) or self.beam_size < 1:
            raise ValueError(f"beam_size must be an int >= 1, got {self.beam_size!r}")
        if not isinstance(self.num_hypotheses, int) or not 1 <= self.num_hypotheses:
            raise ValueError(f"num_hypotheses must be an int >= 1, got {self.num_hypotheses!r}")
        if self.num_hypotheses > self.beam_size and self.beam_size > 1:
            raise ValueError(f"num_hypotheses ({self.num_hypotheses}) cannot exceed beam_size "
                             f"({self.beam_size})")
        if not self.patience > 0:
            raise ValueError(f"patience must be > 0, got {self.patience!r}")

    @property
    def max_candidates(self) -> int:
        return round(self.beam_size * self.patience)


@dataclass
class _Item:
    """One prompt's beams and finished hypotheses."""

    alive: list[list[int]]
    hypotheses: list[tuple[list[int], float, int]] = field(default_factory=list)  # + length
    top_finished: bool = False
    done: bool = False


def beam_search(generator, batch, options, beam: BeamOptions) -> list[list[tuple[list[int], float]]]:
    """Best hypotheses (tokens, score) per prompt, best first."""
    model, device, width = generator.model, generator._device, beam.beam_size
    lengths = [len(request.prompt_ids) for request in batch]
    total = max(n + request.max_new_tokens for n, request in zip(lengths, batch, strict=True))
    cache = generator._kv_cache(len(batch) * width, total)
    tokens, positions = generator._pack([request.prompt_ids for request in batch], cache)
    first_slots = torch.arange(len(batch), device=device) * width
    last = torch.tensor(lengths, device=device) - 1
    logits = model(tokens, positions, cache, kv_length=tokens.shape[1], slots=first_slots,
                   last_index=last)
    for k in range(1, width):  # every beam starts from the prefilled prompt
        cache.copy_slots(first_slots, first_slots + k)

    items = [_Item(alive=[[] for _ in range(width)]) for _ in batch]
    scores = torch.zeros(len(batch), width, device=device)
    end_ids = options.end_ids
    end_ids_tensor, min_new = generator._end_tensors(batch, options)
    longest_min = max(request.min_new_tokens for request in batch)
    usable = generator.spec.usable_vocab_size
    for step in range(max(request.max_new_tokens for request in batch)):
        expanded = step > 0
        if options.processors.active:
            histories = [request.prompt_ids[len(request.prompt_ids) - request.counted_prompt:] + beam_tokens
                         for request, item in zip(batch, items, strict=True)
                         for beam_tokens in (item.alive if expanded else item.alive[:1])]
            logits = options.processors.apply(logits, histories)
        logits = mask_early_end(logits, end_ids_tensor,
                                min_new.repeat_interleave(width) if expanded else min_new, step,
                                longest_min)
        log_probs = logits.log_softmax(dim=-1)
        vocab = log_probs.shape[-1]
        if usable < vocab:  # padding rows of the embedding are never candidates
            log_probs[:, usable:] = float("-inf")
        if expanded:
            candidates = (log_probs.view(len(batch), width, vocab) + scores.unsqueeze(-1))
            candidates = candidates.view(len(batch), width * vocab)
        else:
            candidates = log_probs
        top_scores, top_ids = _candidates(candidates, 2 * width, options)
        origins, words = (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
        top_scores = top_scores.tolist()
        sources, next_words, next_scores = [], [], []
        for b, (request, item) in enumerate(zip(batch, items, strict=True)):
            if not item.done and step == 0 and request.counted_prompt > 0:
                for j in range(1, len(words[b])):  # CTranslate2's first free step after a prefix
                    if words[b][j] in end_ids:
                        top_scores[b][j] = FORCED_OUT
            chosen = _advance(item, request, step, words[b], origins[b], top_scores[b], end_ids,
                              options.return_end_token, beam) if not item.done else \
                list(range(width))
            sources += [b * width + origins[b][j] for j in chosen]
            next_words += [words[b][j] for j in chosen]
            next_scores.append([top_scores[b][j] for j in chosen])
            if not item.done:
                item.alive = [item.alive[origins[b][j]] + [words[b][j]] for j in chosen]
        if all(item.done for item in items):
            break
        scores = torch.tensor(next_scores, device=device)
        destination = torch.arange(len(batch) * width, device=device)
        cache.copy_slots(torch.tensor(sources, device=device), destination)
        step_positions = [cache.scratch_position if items[row // width].done
                          else lengths[row // width] + step for row in range(len(batch) * width)]
        kv_length = max(p for p in step_positions if p != cache.scratch_position) + 1
        logits = model(torch.tensor(next_words, device=device).unsqueeze(1),
                       torch.tensor(step_positions, device=device).unsqueeze(1), cache,
                       kv_length=kv_length)[:, -1]
    return [_finalize(item, request, beam) for item, request in zip(items, batch, strict=True)]


def _candidates(candidates: torch.Tensor, count: int, options) -> tuple[torch.Tensor, torch.Tensor]:
    """The `count` continuations to consider, best first: the top ones, or with sampling a
    draw without replacement (top-k, then temperature, then top-p over all beams' options)."""
    count = min(count, candidates.shape[-1])
    sampling = options.sampling
    if sampling.greedy:
        return candidates.topk(count, dim=-1)
    probs = sampling_probabilities(candidates, sampling)
    drawn = torch.multinomial(probs, count, replacement=False, generator=options.generator)
    scores = candidates.gather(-1, drawn)
    order = scores.argsort(dim=-1, descending=True)
    return scores.gather(-1, order), drawn.gather(-1, order)


def _advance(item: _Item, request, step: int, words: list[int], origins: list[int],
             scores: list[float], end_ids: set[int], return_end_token: bool,
             beam: BeamOptions) -> list[int]:
    """Register finished candidates among the first beam_size; return the candidate index
    each beam continues with."""
    width = beam.beam_size
    is_last = step + 1 >= request.max_new_tokens
    chosen, secondary = [], width
    for k in range(width):
        pick = k
        if words[k] in end_ids or is_last:
            if k == 0:
                item.top_finished = True
            tokens = item.alive[origins[k]] + ([] if words[k] in end_ids and not return_end_token
                                               else [words[k]])
            # The length that normalises the score counts the end token even when hidden.
            length = request.counted_prompt + len(item.alive[origins[k]]) + 1
            item.hypotheses.append((tokens, scores[k], length))
            for j in range(secondary, len(words)):
                if words[j] not in end_ids:
                    pick, secondary = j, j + 1
                    break
        chosen.append(pick)
    if is_last:
        item.done = True
    elif beam.length_penalty == 0:
        item.done = item.top_finished and len(item.hypotheses) >= beam.num_hypotheses
    else:
        item.done = len(item.hypotheses) >= beam.max_candidates
    return chosen


def _finalize(item: _Item, request, beam: BeamOptions) -> list[tuple[list[int], float]]:
    finals = []
    for tokens, score, length in item.hypotheses:
        divisor = length ** beam.length_penalty if length or beam.length_penalty == 0 else 0
        finals.append((tokens, score / divisor if divisor else -math.inf))
    finals.sort(key=lambda pair: pair[1], reverse=True)
    return finals[: beam.num_hypotheses]
