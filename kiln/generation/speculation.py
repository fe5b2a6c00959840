"""Speculative decoding: propose several tokens cheaply, verify them with one target pass.

A request with `prompt_lookup=True` gets up to `num_speculative_tokens` proposals per step
from its own text (the tokens that followed the most recent earlier occurrence of its last
1-3 tokens). The engine runs the request's last token and the proposals through the target
model as one chunk at positions computed..computed+k, with the decode step's activation
numerics, and `verify` walks the k+1 rows of logits in order:

- greedy: a proposal is accepted while it equals the target's own choice; the target's
  token at the first mismatch (or after the last proposal) is emitted too, so the tokens are
  exactly those of plain greedy decoding, k+1 at most per target pass;
- sampling (Leviathan et al. 2023, Chen et al. 2023): proposal d drawn from q is accepted
  with probability min(1, p(d)/q(d)); on rejection the token is drawn from
  norm(max(0, p - q)); after k acceptances a bonus token is drawn from p. p and q are the
  distributions after temperature / top-k / top-p; a prompt-lookup proposal is a point mass,
  so it is accepted with probability p(d) and the residual is p without d. The emitted tokens
  follow the target's distribution exactly.

Rejected proposals are undone by not advancing the slot's length: their keys and values sit
past it, masked, until overwritten.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import SamplingParams, sampling_probabilities
from .search import Decision, TokenSearch


@dataclass
class SpeculationStats:
    """Totals over an engine's life: target passes that verified proposals, proposals made,
    proposals accepted, tokens those passes emitted."""

    verify_passes: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.verify_passes if self.verify_passes else 0.0

MAX_NGRAM = 3


def lookup_proposals(history: Sequence[int], count: int, max_ngram: int = MAX_NGRAM) -> list[int]:
    """Up to `count` tokens that followed the most recent earlier occurrence of the history's
    last n tokens (n = max_ngram down to 1; the longest match wins)."""
    length = len(history)
    if count < 1 or length < 2:
        return []
    for size in range(min(max_ngram, length - 1), 0, -1):
        tail = list(history[length - size:])
        for start in range(length - size - 1, -1, -1):  # most recent first, not the tail itself
            if list(history[start:start + size]) == tail:
                follow = list(history[start + size:start + size + count])
                if follow:
                    return follow
    return []


def accept_or_resample(p: torch.Tensor, proposal: int, q: torch.Tensor | None,
                       generator: torch.Generator | None) -> tuple[int, bool]:
    """One step of the speculative sampling rule: (token, whether the proposal was kept).
    `p`: the target's distribution [V]; `q`: the proposer's, or None for a point mass."""
    q_of = 1.0 if q is None else float(q[proposal])
    draw = torch.rand((), generator=generator, device=p.device).item()
    if q_of > 0 and draw * q_of < float(p[proposal]):  # draw < min(1, p/q)
        return proposal, True
    residual = p.clone()
    if q is None:
        residual[proposal] = 0.0
    else:
        residual = (residual - q).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q: nothing left to correct towards
        residual = p
    return sample(residual, generator), False


def sample(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """A token drawn in proportion to `weights` (the exponential race choose_tokens uses)."""
    noise = torch.empty_like(weights).exponential_(1.0, generator=generator)
    return int((weights / noise).argmax())


def verify(search: TokenSearch, logits: torch.Tensor, proposals: list[int],
           usable_vocab_size: int | None, draft_probs: torch.Tensor | None = None
           ) -> tuple[Decision, int, int]:
    """Walk the target's logits [k+1, V] for the row's last token and k proposals; return the
    merged Decision (every emitted token), how many tokens were emitted (the slot advances by
    that many positions) and how many of them were accepted proposals."""
    shown: list[tuple[int, float]] = []
    tops: list | None = [] if search.top_logprobs else None
    decision = Decision()
    emitted = accepted = 0
    params: SamplingParams = search.sampling
    for index in range(len(proposals) + 1):
        row = logits[index:index + 1].float()
        if search.processors.active:
            row = search.processed(row)
        else:
            row = row.clone()
        if search.ends_masked:
            row[0].index_fill_(0, search.end_tensor(row.device), float("-inf"))
        log_probs = row.log_softmax(dim=-1)
        if usable_vocab_size is not None and usable_vocab_size < row.shape[-1]:
            row[:, usable_vocab_size:] = float("-inf")
        kept = False
        if params.greedy:
            token = int(row.max(dim=-1).indices)
            kept = index < len(proposals) and token == proposals[index]
        else:
            p = sampling_probabilities(row, params)[0]
            if index < len(proposals):
                q = None if draft_probs is None else draft_probs[index]
                token, kept = accept_or_resample(p, proposals[index], q, search.generator)
            else:
                token = sample(p, search.generator)
        decision = search.accept(token, float(log_probs[0, token]), row)
        emitted += 1
        accepted += kept
        shown += decision.tokens
        if tops is not None and decision.tops:
            tops += decision.tops
        if decision.finish_reason is not None or not kept:
            break
    return Decision(inputs=decision.inputs, tokens=shown, finish_reason=decision.finish_reason,
                    tops=tops), emitted, accepted
