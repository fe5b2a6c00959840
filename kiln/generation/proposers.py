"""Where speculative proposals come from. The engine only verifies what a Proposer proposes
(and rolls back what the target rejects); a Proposer only proposes.

- PromptLookup: the tokens that followed the most recent earlier occurrence of the request's
  last 1-3 tokens, found in an n-gram index kept up to date as tokens arrive (no rescan of
  the history).
- DraftProposer: a smaller model with the same tokenizer (draft.py), whose KV cache follows
  the target's slots.

After each step the engine asks the proposers for the next step's proposals; the scheduler
then plans those sequences as verification rows instead of decode rows.
"""

from __future__ import annotations

from collections.abc import Sequence as Tokens

from .draft import DraftModel, DraftRequest
from .scheduler import SlotMove
from .search import TokenSearch
from .sequence import Proposal, Sequence
from .speculation import MAX_NGRAM


class NgramIndex:
    """Where each n-gram (n = 1..max_ngram) of a token history last began, kept up to date as
    the history grows; proposals equal `speculation.lookup_proposals` on the whole history."""

    def __init__(self, tokens: Tokens[int] = (), max_ngram: int = MAX_NGRAM) -> None:
        self.history = list(tokens)
        self.max_ngram = max_ngram
        self._starts: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in _starts

    def extend(self, tokens: Tokens[int]) -> None:
        self.history.extend(tokens)

    def propose(self, count: int) -> list[int]:
        history, length = self.history, len(self.history)
        if count < 1 or length < 2:
            return []
        for end in range(self._indexed, length - 1):  # every n-gram but the tail's own
            for size in range(1, self.max_ngram + 1):
                start = end - size + 1
                if start < 0:
                    break
                self._starts[tuple(history[start:end + 1])] = start
        self._indexed = max(self._indexed, length - 1)
        for size in range(min(self.max_ngram, length - 1), 0, -1):
            start = self._starts.get(tuple(history[length - size:]))
            if start is not None:
                return history[start + size:start + size + count]
        return []


class PromptLookup:
    """Proposals from each request's own text."""

    def __init__(self) -> None:
        self._indexes: dict[int, tuple[NgramIndex, int]] = {}  # id -> (index, tokens seen)

    def propose(self, sequence: Sequence, count: int) -> Proposal | None:
        search: TokenSearch = sequence.search
        entry = self._indexes.get(sequence.id)
        if entry is None:
            entry = (NgramIndex(sequence.request.prompt_ids), 0)
        index, seen = entry
        generated = search.row.tokens
        index.extend(generated[seen:])
        self._indexes[sequence.id] = (index, len(generated))
        tokens = index.propose(count)
        return Proposal(tokens) if tokens else None

    def forget(self, sequence: Sequence) -> None:
        self._indexes.pop(sequence.id, None)


class DraftProposer:
    """Proposals from a draft model, all the step's drafting requests at once."""

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft

    def propose(self, sequences: list[tuple[Sequence, int]]) -> None:
        requests = []
        for sequence, count in sequences:
            history = sequence.request.prompt_ids + sequence.search.row.tokens
            requests.append(DraftRequest(
                sequence.slots[0], history[sequence.draft_computed:sequence.computed + 1],
                sequence.draft_computed, count, sequence.search.sampling,
                sequence.search.generator))
        for (sequence, _), (tokens, probs) in zip(sequences, self.draft.propose(requests),
                                                  strict=True):
            sequence.proposal = Proposal(tokens, probs)
            # its cache now holds the input and all proposals but the last
            sequence.draft_computed = sequence.computed + len(tokens)

    def apply_moves(self, moves: list[SlotMove]) -> None:
        for move in moves:
            self.draft.move(move.source, move.destination, move.draft_length)


class Speculation:
    """The engine's proposers: which one serves a request, and how many tokens it may ask."""

    def __init__(self, draft: DraftModel | None) -> None:
        self.lookup = PromptLookup()
        self.drafter = DraftProposer(draft) if draft is not None else None

    def propose(self, sequences: list[Sequence]) -> None:
        """Set `proposal` on each speculating sequence that gets one: never more tokens than
        the request may still generate minus the one verification adds itself."""
        drafting = []
        for sequence in sequences:
            search = sequence.search
            if not isinstance(search, TokenSearch) or not search.speculative_tokens:
                continue
            count = min(search.speculative_tokens,
                        sequence.request.max_new_tokens - search.steps - 1)
            if count < 1:
                continue
            if search.drafted and self.drafter is not None:
                drafting.append((sequence, count))
            else:
                sequence.proposal = self.lookup.propose(sequence, count)
        if drafting:
            self.drafter.propose(drafting)

    def apply_moves(self, moves: list[SlotMove]) -> None:
        if self.drafter is not None:
            self.drafter.apply_moves(moves)

    def forget(self, sequence: Sequence) -> None:
        self.lookup.forget(sequence)
