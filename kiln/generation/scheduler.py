"""The scheduler: what the next step runs, decided without touching the model.

`schedule()` returns a StepPlan:
- slots of aborted requests are freed, and the used slots compacted (the runner copies the
  moved entries before the forward pass, so decode steps read slots 0..used-1 as a view);
- waiting requests are admitted first come, first served while the oldest fits the free
  slots (a static prompt whose keys/values are stored is copied in instead of prefilled);
- every running request past its prompt decodes one token, or verifies its proposals;
- prompts are prefilled in chunks, oldest first, at most `prefill_budget` tokens a step, so
  a long prompt never stalls the streams already running.

Prompt chunks have fixed boundaries: a chunk never crosses a multiple of the budget (nor the
end of a static prompt being stored). So a prompt is cut the same way whether it runs alone
or beside others, and each chunk's attention sees the same shapes either way; that, with
per-row int8 kernels, is what makes a request's tokens independent of its neighbours.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .events import EngineStats
from .sequence import Sequence
from .slots import SlotTable


class Row(NamedTuple):
    """One token of a decode or verification pass: which slot, which token, at which position."""

    slot: int
    token: int
    position: int


class SlotMove(NamedTuple):
    """Compaction: the entries of `source` move to `destination` (positions 0..length-1 of the
    target's cache, 0..draft_length-1 of the draft model's)."""

    source: int
    destination: int
    length: int
    draft_length: int = 0


@dataclass
class PrefillChunk:
    sequence: Sequence
    start: int  # cache position of tokens[0]
    tokens: list[int]
    save_static: bool = False  # the static prompt is complete after it: store its state

    @property
    def slot(self) -> int:
        return self.sequence.slots[0]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def completes_prompt(self) -> bool:
        return self.end >= self.sequence.prompt_length

    @property
    def all_logits(self) -> bool:
        return self.sequence.search.all_logits


@dataclass
class StepPlan:
    moves: list[SlotMove] = field(default_factory=list)
    aborted: list[Sequence] = field(default_factory=list)  # end now, slots already freed
    admitted: list[Sequence] = field(default_factory=list)
    static_loads: list[Sequence] = field(default_factory=list)  # copy their stored prefix in
    decode: list[Sequence] = field(default_factory=list)  # one token per row
    verify: list[Sequence] = field(default_factory=list)  # their proposals, checked
    prefill: list[PrefillChunk] = field(default_factory=list)

    @property
    def runs_model(self) -> bool:
        return bool(self.decode or self.verify or self.prefill)

    @property
    def sequences(self) -> list[Sequence]:
        """The requests whose tokens or prompt this step computes."""
        chunked = [chunk.sequence for chunk in self.prefill]
        return [*self.decode, *self.verify, *chunked]

    @property
    def prefill_tokens(self) -> int:
        return sum(len(chunk.tokens) for chunk in self.prefill)

    def split(self) -> list[StepPlan]:
        """The plan as it runs: its prompt chunks first, so that a new request's first token
        goes out before the step's decode pass (which writes other slots only); then the
        decode and verify rows."""
        if not self.prefill or not (self.decode or self.verify):
            return [self]
        return [StepPlan(self.moves, self.aborted, self.admitted, self.static_loads,
                         prefill=self.prefill),
                StepPlan(decode=self.decode, verify=self.verify)]

    def decode_rows(self) -> list[Row]:
        return [Row(slot, token, sequence.computed) for sequence in self.decode
                for slot, token in zip(sequence.slots, sequence.inputs, strict=True)]

    def verify_rows(self) -> list[Row]:
        """Each sequence's last token and its proposals, at consecutive positions of its slot."""
        return [Row(sequence.slots[0], token, sequence.computed + offset)
                for sequence in self.verify
                for offset, token in enumerate([sequence.inputs[0], *sequence.proposal.tokens])]


class Scheduler:
    def __init__(self, slots: SlotTable, prefill_budget: int,
                 has_static_state: Callable[[tuple[int, ...]], bool] = lambda key: False) -> None:
        if prefill_budget < 1:
            raise ValueError(f"the prefill budget must be >= 1 token, got {prefill_budget}")
        self.slots = slots
        self.prefill_budget = prefill_budget
        self.has_static_state = has_static_state
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ------------------------------------------------------------ intake

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def remove_waiting(self, sequence: Sequence) -> bool:
        """Take a request out of the queue (an abort before it started): True if it was there."""
        try:
            self.waiting.remove(sequence)
        except ValueError:
            return False
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        running = sum(1 for sequence in self.running if not sequence.finished)
        return EngineStats(len(self.waiting), running, self.slots.num_slots, self.slots.used_count)

    # ------------------------------------------------------------ planning

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        plan.aborted = [s for s in self.running if s.abort_requested and not s.finished]
        plan.moves = self.release(extra=plan.aborted)
        self._admit(plan)
        for sequence in self.running:
            if sequence.finished or sequence.abort_requested or not sequence.prompt_done:
                continue
            (plan.verify if sequence.proposal is not None else plan.decode).append(sequence)
        plan.prefill = self._prefill_chunks()
        return plan

    def release(self, extra: list[Sequence] = ()) -> list[SlotMove]:
        """Free the slots of finished requests (and of `extra`), then compact the used slots:
        the moves whose entries must be copied, in order."""
        leaving = {id(s) for s in extra}
        done = [s for s in self.running if s.finished or id(s) in leaving]
        if not done:
            return []
        self.running = [s for s in self.running if not (s.finished or id(s) in leaving)]
        for sequence in done:
            self.slots.release(sequence.slots)
            sequence.slots = []
        owners = {slot: sequence for sequence in self.running for slot in sequence.slots}
        moves = []
        for source, destination, length in self.slots.compaction_plan():
            sequence = owners.pop(source)
            sequence.slots = [destination if slot == source else slot for slot in sequence.slots]
            owners[destination] = sequence
            moves.append(SlotMove(source, destination, length, sequence.draft_computed))
        return moves

    def _admit(self, plan: StepPlan) -> None:
        """First come, first served: admit while the oldest waiting request fits."""
        while self.waiting:
            sequence = self.waiting[0]
            slots = self.slots.allocate(sequence.rows)
            if slots is None:
                return
            self.waiting.popleft()
            sequence.slots = slots
            sequence.started_at = time.perf_counter()
            plan.admitted.append(sequence)
            request = sequence.request
            if sequence.save_static:
                key = tuple(request.prompt_ids[: request.static_length])
                if self.has_static_state(key):
                    sequence.computed = request.static_length
                    sequence.save_static = False
                    for slot in slots:
                        self.slots.lengths[slot] = sequence.computed
                    plan.static_loads.append(sequence)
            self.running.append(sequence)

    def _prefill_chunks(self) -> list[PrefillChunk]:
        """Oldest prompt first; a chunk that would exceed what is left of the budget waits
        (a younger, shorter one may go), so the oldest always progresses."""
        left, chunks = self.prefill_budget, []
        for sequence in self.running:
            if left == 0:
                break
            if sequence.finished or sequence.abort_requested or sequence.prompt_done:
                continue
            end = self.chunk_end(sequence)
            if end - sequence.computed <= left:
                tokens = sequence.request.prompt_ids[sequence.computed:end]
                saves = sequence.save_static and end == sequence.request.static_length
                chunks.append(PrefillChunk(sequence, sequence.computed, tokens, saves))
                left -= len(tokens)
        return chunks

    def chunk_end(self, sequence: Sequence) -> int:
        """Where the sequence's next prompt chunk ends: the prompt's end, the next multiple of
        the budget, or the end of a static prompt to store, whichever comes first."""
        start = sequence.computed
        end = min(sequence.prompt_length, (start // self.prefill_budget + 1) * self.prefill_budget)
        static = sequence.request.static_length
        if sequence.save_static and start < static:
            end = min(end, static)
        return end
