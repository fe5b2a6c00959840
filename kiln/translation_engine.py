"""Continuous batching for a Translator: one thread decodes every live row of every request
in one decoder pass per step, and requests join between steps.

A `translate_batch` call (from any thread) hands its sentences to the engine and waits. Each
sentence is admitted when the slot pool has room for its rows (its beam): its source is
encoded once (the encoder states become the cross-attention keys and values it keeps until
it finishes), its start token and target prefix are run, and from then on its rows are part
of every step, whatever other calls are running. A row writes its self-attention keys at its
own positions in its slot (model/seq2seq_slots.py), so sentences that started at different
times share the pass; a finished sentence gives its slots back at once.

Each sentence is still searched on its own (its own search object, sampling stream and
rows), so its tokens do not depend on what else is running.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field

import torch

from .generation.static_step import kv_bucket, read_bucket
from .model.seq2seq_slots import SlotPool
from .translation_search import Job

_SERIALS = itertools.count()
IDLE_SECONDS = 5.0  # the loop thread ends after this long without work


@dataclass
class _Ticket:
    """One translate_batch call's jobs, and its caller waiting."""

    jobs: list[Job]
    attention: bool
    done: threading.Event = field(default_factory=threading.Event)
    left: int = 0
    error: BaseException | None = None


@dataclass
class _Live:
    """A sentence being decoded: its rows' slots, its next position and source."""

    job: Job
    ticket: _Ticket
    slots: list[int]
    position: int
    cross: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [1, H, S, D]
    inputs: list[int] = field(default_factory=list)  # the tokens its rows feed next
    serial: int = field(default_factory=lambda: next(_SERIALS))  # never reused, unlike id()


class TranslationEngine:
    def __init__(self, model, device: torch.device, dtype: torch.dtype,
                 max_rows: int = 256) -> None:
        self.model, self.device, self.spec = model, device, model.spec
        self.max_rows = max_rows
        spec = model.spec
        self.pool = SlotPool(len(model.decoder_layers), spec.num_heads, spec.head_dim, dtype,
                             device)
        self.free: list[int] = []
        self.inbox: queue.Queue[_Ticket] = queue.Queue()
        self.waiting: list[tuple[Job, _Ticket]] = []
        self.live: list[_Live] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._layout: tuple | None = None  # the rows of the last step, and their sources
        self._cross = None
        self.steps = 0  # decoder passes over live rows
        self.shared_steps = 0  # passes whose rows came from more than one call

    def run(self, jobs: list[Job], attention: bool = False) -> None:
        """Decode `jobs` (their searches hold the results); returns when all are done."""
        if not jobs:
            return
        ticket = _Ticket(jobs, attention, left=len(jobs))
        with self._lock:
            self.inbox.put(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kiln-translate",
                                                daemon=True)
                self._thread.start()
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        """Until idle for IDLE_SECONDS (then the thread ends and lets the model be freed;
        the next call starts another)."""
        while True:
            if not self._take(block=not self.live and not self.waiting):
                with self._lock:
                    if self.inbox.empty():
                        self._thread = None
                        return
                continue
            try:
                with torch.inference_mode():
                    self._admit()
                    if self.live:
                        self._step()
            except Exception as error:  # noqa: BLE001 - handed to every caller in flight
                self._fail(error)

    def _take(self, block: bool) -> bool:
        """Move new calls' jobs to the waiting list; False when idle too long."""
        try:
            ticket = self.inbox.get(timeout=IDLE_SECONDS) if block else self.inbox.get_nowait()
        except queue.Empty:
            return not block
        while True:
            self.waiting += [(job, ticket) for job in ticket.jobs]
            try:
                ticket = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _fail(self, error: BaseException) -> None:
        tickets = {id(live.ticket): live.ticket for live in self.live}
        tickets.update({id(ticket): ticket for _, ticket in self.waiting})
        self.live, self.waiting = [], []
        self.free = list(range(self.pool.rows))
        self._layout = None
        for ticket in tickets.values():
            ticket.error = error
            ticket.done.set()

    def _finish(self, live: _Live) -> None:
        self.free = sorted(self.free + live.slots)  # low slots first: rows stay dense
        ticket = live.ticket
        ticket.left -= 1
        if ticket.left == 0:
            ticket.done.set()

    # ------------------------------------------------------------ admission

    def _admit(self) -> None:
        """Admit waiting sentences while their beams fit: encode their sources together,
        then run each group of equal prefix length over its start tokens."""
        admitted: list[tuple[Job, _Ticket, list[int]]] = []
        while self.waiting:
            job, ticket = self.waiting[0]
            width = getattr(job.search, "rows", 1)
            if len(self.free) < width:
                used = self.pool.rows - len(self.free)
                if used + width > self.max_rows and (self.live or admitted):
                    break  # wait for slots to come back
                old = self.pool.rows
                self.pool.reserve(max(2 * old, used + width, 8), self.pool.length)
                self.free += list(range(old, self.pool.rows))
            needed = self._length(job)
            if needed > self.pool.length:
                self.pool.reserve(self.pool.rows, -(-needed // 64) * 64)
            self.waiting.pop(0)
            admitted.append((job, ticket, [self.free.pop(0) for _ in range(width)]))
        if not admitted:
            return
        jobs = [job for job, _, _ in admitted]
        width = max(len(job.source) for job in jobs)
        ids = torch.full((len(jobs), width), self.spec.pad_token_id, dtype=torch.long)
        for row, job in enumerate(jobs):
            ids[row, :len(job.source)] = torch.tensor(job.source)
        lengths = torch.tensor([len(job.source) for job in jobs])
        states, _ = self.model.encode(ids.to(self.device), lengths.to(self.device))
        cross = self.model.cross_keys_values(states)
        groups: dict[int, list[int]] = {}
        for row, job in enumerate(jobs):
            groups.setdefault(len(job.request.prompt_ids), []).append(row)
        for members in groups.values():
            self._start([_Live(jobs[m], admitted[m][1], admitted[m][2], 0,
                               [(k[m:m + 1, :, :len(jobs[m].source)],
                                 v[m:m + 1, :, :len(jobs[m].source)]) for k, v in cross])
                         for m in members])

    def _read(self, needed: int) -> int:
        """Columns a pass reads: whole buckets, as the decoders' steps read theirs."""
        return kv_bucket(needed, self.pool.length, read_bucket(self.device))

    def _length(self, job: Job) -> int:
        request = job.request
        return len(request.prompt_ids) + request.max_new_tokens + 1

    def _start(self, lives: list[_Live]) -> None:
        """The start tokens and prefix of sentences of equal prefix length, in one pass."""
        prompts = torch.tensor([live.job.request.prompt_ids for live in lives],
                               device=self.device)
        length = prompts.shape[1]
        starts = torch.zeros(len(lives), dtype=torch.long, device=self.device)
        positions = starts.view(-1, 1) + torch.arange(length, device=self.device)
        views = self.pool.views([live.slots[0] for live in lives], positions,
                                self._read(length), uniform=True)
        cross, mask = _padded([live.cross for live in lives],
                              [len(live.job.source) for live in lives], self.device)
        weights: list | None = [] if any(live.ticket.attention for live in lives) else None
        logits = self.model.decode(prompts, starts, views, cross, mask, weights)
        for row, live in enumerate(lives):
            live.position = length
            rows_attention = None
            if weights and live.ticket.attention:
                source = len(live.job.source)
                live.job.search.start_attention(weights[0][row, :-1, :source].tolist())
                rows_attention = weights[0][row:row + 1, -1, :source]
            if self._advance(live, logits[row:row + 1], [live.slots[0]], rows_attention):
                self.live.append(live)

    # ------------------------------------------------------------ steps

    def _step(self) -> None:
        """One decoder pass over every live row."""
        lives = self.live
        slots = [slot for live in lives for slot in live.slots[:len(live.inputs)]]
        tokens = [token for live in lives for token in live.inputs]
        positions = [live.position for live in lives for _ in live.inputs]
        starts = torch.tensor(positions, device=self.device)
        uniform = min(positions) == max(positions)  # one call's sentences: all at one position
        views = self.pool.views(slots, starts.view(-1, 1), self._read(max(positions) + 1),
                                uniform=uniform)
        layout = tuple((live.serial, len(live.inputs)) for live in lives)
        if layout != self._layout:  # rows' sources, gathered again only when rows change
            owners = [live for live in lives for _ in live.inputs]
            self._cross = _padded([live.cross for live in owners],
                                  [len(live.job.source) for live in owners], self.device)
            self._layout = layout
        cross, mask = self._cross
        weights: list | None = [] if any(live.ticket.attention for live in lives) else None
        logits = self.model.decode(torch.tensor(tokens, device=self.device)[:, None], starts,
                                   views, cross, mask, weights)
        self.steps += 1
        self.shared_steps += len({id(live.ticket) for live in lives}) > 1
        row, still = 0, []
        for live in lives:
            count = len(live.inputs)
            live.position += 1
            rows_attention = None
            if weights and live.ticket.attention:
                rows_attention = weights[0][row:row + count, -1, :len(live.job.source)]
            if self._advance(live, logits[row:row + count], live.slots[:count], rows_attention):
                still.append(live)
            row += count
        self.live = still

    def _advance(self, live: _Live, logits: torch.Tensor, rows: list[int],
                 rows_attention: torch.Tensor | None) -> bool:
        """Give a sentence's logits to its search and lay out its rows for the next step;
        False when it finished (its slots are free again)."""
        search = live.job.search
        decision = (search.advance(logits) if rows_attention is None
                    else search.advance(logits, rows_attention))
        if decision.finish_reason is not None:
            self._finish(live)
            return False
        sources = decision.sources or list(range(len(decision.inputs)))
        wanted = [rows[source] for source in sources]
        targets = live.slots[:len(decision.inputs)]
        if wanted != targets:  # beams continue other beams: copy their filled positions
            self.pool.copy(wanted, targets, live.position)
        live.inputs = list(decision.inputs)
        return True


def _padded(crosses: list[list[tuple[torch.Tensor, torch.Tensor]]], lengths: list[int],
            device: torch.device):
    """Rows' cross-attention keys/values padded to the longest source, and the mask."""
    width = max(lengths)
    layers = []
    for index in range(len(crosses[0])):
        keys, values = [], []
        for cross, length in zip(crosses, lengths, strict=True):
            k, v = cross[index]
            pad = (0, 0, 0, width - length)
            keys.append(torch.nn.functional.pad(k, pad) if length < width else k)
            values.append(torch.nn.functional.pad(v, pad) if length < width else v)
        layers.append((torch.cat(keys), torch.cat(values)))
    lengths_tensor = torch.tensor(lengths, device=device)
    mask = (torch.arange(width, device=device)[None, :] < lengths_tensor[:, None])
    return layers, mask[:, None, None, :]
