"""The scheduler alone, without a model: what each step runs, decided from the requests'
state. A tiny stand-in for the runner and updater plays the steps out."""

from __future__ import annotations

import random

import pytest

from kiln.generation.events import FinishReason
from kiln.generation.requests import Request
from kiln.generation.scheduler import Scheduler
from kiln.generation.sequence import Proposal, Sequence
from kiln.generation.slots import SlotTable


class FakeSearch:
    all_logits = False

    def __init__(self, rows: int = 1) -> None:
        self.rows = rows


def make(request_id: int, prompt: int, new_tokens: int = 4, rows: int = 1,
         static: int = 0) -> Sequence:
    request = Request(list(range(1, prompt + 1)), new_tokens, 0, [], 0, static_length=static)
    return Sequence(request_id, request, FakeSearch(rows), save_static=bool(static))


def play(scheduler: Scheduler, plan) -> None:
    """What the engine does with a plan: prompts advance, decode rows make a token, requests
    that reached their length finish, then slots are released."""
    for chunk in plan.prefill:
        chunk.sequence.computed = chunk.end
        if chunk.completes_prompt:
            chunk.sequence.inputs = [0] * chunk.sequence.rows
            generate(chunk.sequence)
    for sequence in plan.decode:
        sequence.computed += 1
        generate(sequence)
    for sequence in plan.aborted:
        sequence.finish_reason = FinishReason.ABORT
    scheduler.release()


def generate(sequence: Sequence) -> None:
    sequence.reported += 1
    if sequence.reported >= sequence.request.max_new_tokens:
        sequence.finish_reason = FinishReason.LENGTH


def run_all(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], steps: int = 500):
    plans = []
    for step in range(steps):
        for sequence in arrivals.get(step, []):
            scheduler.add(sequence)
        if not scheduler.has_work() and step > max(arrivals, default=0):
            break
        plan = scheduler.schedule()
        plans.append(plan)
        play(scheduler, plan)
    return plans


def test_the_prefill_budget_holds_and_decode_rows_always_run():
    scheduler = Scheduler(SlotTable(8, 4096), prefill_budget=64)
    picker = random.Random(3)
    arrivals = {step: [make(step * 10 + i, picker.randint(1, 300), picker.randint(1, 20))
                       for i in range(picker.randint(0, 3))] for step in range(0, 60, 3)}
    plans = run_all(scheduler, arrivals)
    for plan in plans:
        assert plan.prefill_tokens <= 64
        decoding = {id(s) for s in plan.decode}
        for sequence in scheduler.running:
            assert sequence.finished or not sequence.prompt_done or id(sequence) in decoding \
                or sequence in plan.admitted
    assert not scheduler.has_work()
    assert scheduler.slots.used_count == 0


def test_a_long_prompt_never_stalls_running_streams():
    scheduler = Scheduler(SlotTable(4, 4096), prefill_budget=16)
    running = make(0, 3, new_tokens=100)
    scheduler.add(running)
    play(scheduler, scheduler.schedule())  # its prompt and first token
    long = make(1, 200, new_tokens=2)
    scheduler.add(long)
    chunks = []
    while not long.prompt_done:
        plan = scheduler.schedule()
        assert plan.decode == [running]  # a token every step while the long prompt prefills
        assert [c.sequence for c in plan.prefill] == [long] and plan.prefill_tokens <= 16
        chunks.append((plan.prefill[0].start, plan.prefill[0].end))
        play(scheduler, plan)
    assert len(chunks) == 200 // 16 + 1
    assert chunks[0] == (0, 16) and chunks[-1] == (192, 200)


def test_first_come_first_served_and_admission_as_slots_free_up():
    scheduler = Scheduler(SlotTable(3, 4096), prefill_budget=512)
    first, beam, small = make(0, 5, 2), make(1, 5, 2, rows=3), make(2, 5, 2)
    for sequence in (first, beam, small):
        scheduler.add(sequence)
    plan = scheduler.schedule()
    # the beam needs 3 slots: it waits for them, and the younger one waits behind it
    assert plan.admitted == [first] and list(scheduler.waiting) == [beam, small]
    play(scheduler, plan)
    plan = scheduler.schedule()
    assert plan.admitted == [] and plan.decode == [first]
    play(scheduler, plan)  # the first finishes: its slot is free
    plan = scheduler.schedule()
    assert plan.admitted == [beam] and beam.slots == [0, 1, 2]
    play(scheduler, plan)
    plans = run_all(scheduler, {})
    assert [s for p in plans for s in p.admitted] == [small]
    assert scheduler.slots.used_count == 0


@pytest.mark.parametrize("where", ["queue", "prefill", "decode"])
def test_aborts_free_slots_for_the_next_in_line_in_the_same_step(where):
    scheduler = Scheduler(SlotTable(1, 4096), prefill_budget=8)
    victim, next_in_line = make(0, 20, new_tokens=50), make(1, 3, new_tokens=2)
    scheduler.add(victim)
    scheduler.add(next_in_line)
    if where == "queue":
        assert scheduler.remove_waiting(next_in_line)
        assert not scheduler.remove_waiting(next_in_line)
        assert list(scheduler.waiting) == [victim]
        return
    play(scheduler, scheduler.schedule())  # admitted, first chunk of 8
    if where == "decode":
        while not victim.prompt_done:
            play(scheduler, scheduler.schedule())
    victim.abort_requested = True
    plan = scheduler.schedule()
    assert plan.aborted == [victim] and victim.slots == []
    assert plan.admitted == [next_in_line]  # the freed slot, in the same step
    assert victim not in plan.decode and all(c.sequence is not victim for c in plan.prefill)
    assert scheduler.slots.used_count == 1


def test_prompts_are_cut_at_the_same_boundaries_alone_or_beside_others():
    """A chunk never crosses a multiple of the budget: how a prompt is cut does not depend on
    what runs beside it (the precondition of batch-invariant prefill attention)."""
    def cuts(with_others: bool, seed: int) -> list[tuple[int, int]]:
        scheduler = Scheduler(SlotTable(8, 4096), prefill_budget=32)
        target = make(99, 150, new_tokens=1)
        picker = random.Random(seed)
        arrivals = {0: [make(i, picker.randint(1, 70), 3) for i in range(3)] if with_others else []}
        arrivals.setdefault(picker.randint(0, 3) if with_others else 0, []).append(target)
        if with_others:
            arrivals[4] = [make(50 + i, picker.randint(5, 90), 3) for i in range(2)]
        found = []
        for plan in run_all(scheduler, arrivals):
            found += [(c.start, c.end) for c in plan.prefill if c.sequence is target]
        return found

    alone = cuts(False, 0)
    assert alone == [(0, 32), (32, 64), (64, 96), (96, 128), (128, 150)]
    for seed in range(5):
        assert cuts(True, seed) == alone


def test_compaction_keeps_used_slots_dense():
    scheduler = Scheduler(SlotTable(4, 4096), prefill_budget=512)
    sequences = [make(i, 3, new_tokens=1 if i in (0, 2) else 10) for i in range(4)]
    for sequence in sequences:
        scheduler.add(sequence)
    play(scheduler, scheduler.schedule())  # 0 and 2 finish with their first token
    plan = scheduler.schedule()
    assert sorted(s.slots[0] for s in plan.decode) == [0, 1]
    assert scheduler.slots.high == 2


def test_compaction_moves_tell_what_to_copy():
    table = SlotTable(4, 4096)
    scheduler = Scheduler(table, prefill_budget=512)
    sequences = [make(i, 3, new_tokens=1 if i == 0 else 10) for i in range(3)]
    for sequence in sequences:
        scheduler.add(sequence)
    plan = scheduler.schedule()
    for chunk in plan.prefill:
        table.lengths[chunk.slot] = 3
    sequences[2].draft_computed = 2
    sequences[0].finish_reason = FinishReason.LENGTH
    moves = scheduler.release()
    assert [tuple(m) for m in moves] == [(2, 0, 3, 2)]  # the highest slot fills the hole
    assert sequences[2].slots == [0] and table.high == 2


def test_a_stored_static_prompt_is_loaded_and_a_new_one_stored_at_its_end():
    stored = {tuple(range(1, 6))}
    scheduler = Scheduler(SlotTable(2, 4096), prefill_budget=512,
                          has_static_state=lambda key: key in stored)
    hit, miss = make(0, 9, static=5), make(1, 12, static=7)
    scheduler.add(hit)
    scheduler.add(miss)
    plan = scheduler.schedule()
    assert plan.static_loads == [hit] and hit.computed == 5 and not hit.save_static
    chunks = {c.sequence.id: c for c in plan.prefill}
    assert (chunks[0].start, chunks[0].end, chunks[0].save_static) == (5, 9, False)
    assert (chunks[1].start, chunks[1].end, chunks[1].save_static) == (0, 7, True)


def test_sequences_with_proposals_verify_instead_of_decoding():
    scheduler = Scheduler(SlotTable(2, 4096), prefill_budget=512)
    plain, speculating = make(0, 2, 10), make(1, 2, 10)
    for sequence in (plain, speculating):
        scheduler.add(sequence)
    play(scheduler, scheduler.schedule())
    speculating.proposal = Proposal([7, 8, 9])
    plan = scheduler.schedule()
    assert plan.decode == [plain] and plan.verify == [speculating]
    rows = plan.verify_rows()
    assert [(r.slot, r.token, r.position) for r in rows] == [
        (1, 0, 2), (1, 7, 3), (1, 8, 4), (1, 9, 5)]
