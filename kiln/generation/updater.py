"""Applying a step's outputs: each request's search picks its tokens from the logits, text
is decoded and checked for stop strings, finish reasons are decided and events made.

Nothing here touches the model or a lock: the stepping thread owns running requests. A
request whose search fails (a processor raising, say) fails alone; the others of the step
go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .events import FinishReason, TokenEvent
from .options import MAX_SPECULATIVE_TOKENS
from .runner import StepOutput
from .scheduler import StepPlan
from .search import Decision, TokenSearch, choose_for
from .sequence import Sequence
from .slots import SlotTable
from .speculation import SpeculationStats, verify

log = logging.getLogger("kiln.engine")


@dataclass
class Outcome:
    """What a step did to one request: the events to hand out and, if it ended, why."""

    sequence: Sequence
    events: list[TokenEvent] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None


class Updater:
    def __init__(self, slots: SlotTable, usable_vocab_size: int, copy_rows,
                 stats: SpeculationStats) -> None:
        self.slots, self.usable = slots, usable_vocab_size
        self.copy_rows = copy_rows  # (sources, destinations, length): beams' slot copies
        self.stats = stats

    def apply(self, plan: StepPlan, output: StepOutput) -> list[Outcome]:
        outcomes: list[Outcome] = []
        choices: list[tuple[Sequence, torch.Tensor]] = []  # (sequence, its rows' logits)
        for chunk, logits in zip(plan.prefill, output.prefill or [], strict=True):
            sequence = chunk.sequence
            self._advance(sequence, len(chunk.tokens))
            if sequence.search.all_logits:
                sequence.search.add_chunk(chunk.start, logits)
            if chunk.completes_prompt:
                choices.append((sequence, logits[-1:]))
        row = 0
        for sequence in plan.decode:
            self._advance(sequence, 1)
            choices.append((sequence, output.decode[row:row + len(sequence.slots)]))
            row += len(sequence.slots)
        whole = output.decode if len(choices) == len(plan.decode) == row else None
        outcomes += self._choose(choices, whole)
        first = 0
        for sequence in plan.verify:
            width = len(sequence.proposal.tokens) + 1
            outcomes.append(self._guarded(sequence, self._verified, sequence,
                                          output.verify[first:first + width]))
            first += width
        return outcomes

    def _advance(self, sequence: Sequence, positions: int) -> None:
        sequence.computed += positions
        for slot in sequence.slots:
            self.slots.lengths[slot] = sequence.computed

    def _choose(self, choices: list[tuple[Sequence, torch.Tensor]],
                whole: torch.Tensor | None = None) -> list[Outcome]:
        """Tokens for every greedy/sampled row at once (one op over the step's rows), each
        other search on its own. If the batched choice fails, each row is retried alone so
        that only the request at fault fails. `whole`: the logits of all the choices' rows
        in order (a decode pass of one-row requests), used as they are instead of copied."""
        tokens = [(s, logits) for s, logits in choices if isinstance(s.search, TokenSearch)]
        others = [(s, logits) for s, logits in choices if not isinstance(s.search, TokenSearch)]
        outcomes = []
        if tokens:
            try:
                if whole is not None and len(tokens) == len(choices):
                    block = whole
                elif len(tokens) > 1:
                    block = torch.cat([logits for _, logits in tokens])
                else:
                    block = tokens[0][1]
                decisions = choose_for([s.search for s, _ in tokens], block, self.usable)
            except Exception:  # noqa: BLE001 - isolate the request at fault, below
                others = tokens + others
            else:
                outcomes += [self._decided(s, d) for (s, _), d in
                             zip(tokens, decisions, strict=True)]
        for sequence, logits in others:
            outcomes.append(self._guarded(sequence, self._searched, sequence, logits))
        return outcomes

    def _searched(self, sequence: Sequence, logits: torch.Tensor) -> Outcome:
        if isinstance(sequence.search, TokenSearch):
            decision = choose_for([sequence.search], logits, self.usable)[0]
        else:
            decision = sequence.search.advance(logits)
        return self._decided(sequence, decision)

    def _verified(self, sequence: Sequence, logits: torch.Tensor) -> Outcome:
        """Accept proposals; the slot advances past the accepted ones and the target's own
        token, so rejected positions are simply written over later."""
        proposal, search = sequence.proposal, sequence.search
        sequence.proposal = None
        decision, emitted, accepted = verify(search, logits, proposal.tokens, self.usable,
                                             proposal.draft_probs)
        self._advance(sequence, emitted)
        sequence.draft_computed = min(sequence.draft_computed, sequence.computed)
        stats = self.stats
        stats.verify_passes += 1
        stats.proposed += len(proposal.tokens)
        stats.accepted += accepted
        stats.emitted += emitted
        if search.adaptive_speculation:  # longer runs while they are accepted
            search.speculative_tokens = (
                min(search.speculative_tokens + 2, MAX_SPECULATIVE_TOKENS)
                if accepted == len(proposal.tokens) else max(search.speculative_tokens - 1, 1))
        return self._decided(sequence, decision)

    def _guarded(self, sequence: Sequence, work, *args) -> Outcome:
        try:
            return work(*args)
        except Exception as error:  # noqa: BLE001 - this request fails, the step goes on
            log.error("request %d failed while choosing its tokens", sequence.id, exc_info=True)
            return failed(sequence, error)

    def _decided(self, sequence: Sequence, decision: Decision) -> Outcome:
        """Report the decision's tokens; decode text and stop at a stop string."""
        if decision.sources is not None:
            self._reorder(sequence, decision.sources)
        sequence.inputs = decision.inputs
        reason = None if decision.finish_reason is None else FinishReason(decision.finish_reason)
        events = []
        text = sequence.text
        for index, (token, log_prob) in enumerate(decision.tokens):
            top = decision.tops[index] if decision.tops else None
            events.append(TokenEvent(sequence.id, token, text.add(token) if text else "",
                                     log_prob, sequence.reported, top_log_probs=top))
            sequence.reported += 1
            if text is not None and text.stopped:
                reason = FinishReason.STOP
                break
        if reason is not None:
            if not events:
                events.append(TokenEvent(sequence.id, None, index=sequence.reported))
            if text is not None:
                events[-1].text += text.finish()
            events[-1].finish_reason = reason
        return Outcome(sequence, events, reason)

    def _reorder(self, sequence: Sequence, sources: list[int]) -> None:
        """Row k continues old row sources[k]: copy the slots' filled positions accordingly."""
        pairs = [(sequence.slots[source], slot)
                 for source, slot in zip(sources, sequence.slots, strict=True)
                 if sequence.slots[source] != slot]
        if pairs:
            self.copy_rows([a for a, _ in pairs], [b for _, b in pairs], sequence.computed)


def failed(sequence: Sequence, error: BaseException) -> Outcome:
    return Outcome(sequence, [TokenEvent(sequence.id, None, index=sequence.reported,
                                         finish_reason=FinishReason.ERROR, error=error)],
                   FinishReason.ERROR, error)


def ended(sequence: Sequence, reason: FinishReason) -> Outcome:
    """A request ended from outside a step (aborted): its last event, with any text held."""
    tail = sequence.text.finish() if sequence.text is not None else ""
    return Outcome(sequence, [TokenEvent(sequence.id, None, tail, index=sequence.reported,
                                         finish_reason=reason)], reason)
