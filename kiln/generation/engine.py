"""The engine: continuous batching over the KV slot pool.

Requests wait in line (first come, first served) until enough slots are free; then each
`step()` runs one decode token for every running request plus at most
`max_prefill_tokens_per_step` prompt tokens of newly admitted ones (chunked prefill), picks
the next tokens, reports them as `TokenEvent`s and frees the slots of finished requests in
the same step. Every request has its own options (sampling, seed, penalties, end tokens,
stop strings, lengths), and its tokens do not depend on the requests it shares steps with.

`Engine` is driven by whoever calls it: `step()` directly, or `stream(id)` / `wait(ids)`,
which step until their requests progress. Several threads may use one engine: one of them
runs a step for everyone while the others wait for its result. `AsyncEngine`
(async_engine.py) runs the steps on a thread of its own for asyncio code.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import KilnError, OutOfMemory, RequestError
from .beam import BeamSearch
from .draft import DraftModel, DraftRequest
from .loaded_model import LoadedModel, open_model
from .options import MAX_SPECULATIVE_TOKENS, GenerationOptions
from .requests import Request, RequestBuilder
from .runner import Chunk, ModelRunner
from .scheduler import plan_prefill
from .search import Decision, Search, TokenSearch, choose_for
from .slots import KV_DTYPES, SlotPool, bytes_per_slot, parse_memory
from .speculation import SpeculationStats, lookup_proposals, verify
from .text import TextStream

DEFAULT_SLOTS = 16
PREFILL_TOKENS_PER_STEP = {"cpu": 512, "cuda": 8192}  # a GPU wants big GEMMs
UNCLAIMED_OUTPUTS = 1024  # finished requests kept for result() when nobody has asked yet
FINISH_REASONS = ("length", "stop", "abort")


@dataclass
class TokenEvent:
    """What a step produced for a request: a token (None when the request ended on a hidden
    end token or was aborted), the text it added (text requests), its log-probability under
    the model, and on the request's last event, why it finished."""

    request_id: int
    token_id: int | None
    text: str = ""
    log_prob: float | None = None
    index: int = 0  # how many tokens the request reported before this one
    finish_reason: str | None = None  # "length" | "stop" | "abort" on the last event
    error: BaseException | None = None  # the step failed: the request ends with this error
    top_log_probs: list[tuple[int, float]] | None = None  # (token, log_prob), top_logprobs > 0


@dataclass
class RequestOutput:
    request_id: int
    request: Request
    search: Search
    finish_reason: str
    text: str | None = None  # the whole continuation, for text requests

    @property
    def result(self):
        """The search's result: a RowState (tokens, score, logits), beam hypotheses,
        alternatives' expansions or scores."""
        return self.search.result()


@dataclass
class _Sequence:
    id: int
    request: Request
    search: Search
    text: TextStream | None = None
    sink: Callable[[TokenEvent], None] | None = None
    slots: list[int] = field(default_factory=list)
    computed: int = 0  # cache positions filled (the same for all of the request's rows)
    inputs: list[int] = field(default_factory=list)  # next decode input of each row
    save_static: bool = False  # store the static prompt's keys/values once computed
    draft_computed: int = 0  # positions of the draft model's cache that hold this request
    reported: int = 0
    events: deque = field(default_factory=deque)
    finish_reason: str | None = None
    error: BaseException | None = None

    @property
    def prompt_done(self) -> bool:
        return self.computed >= len(self.request.prompt_ids)


@dataclass
class EngineStats:
    waiting: int
    running: int
    slots: int
    slots_used: int


class Engine:
    """Continuous batching over a fixed pool of KV cache slots (see the module docstring).

    The pool holds `max_batch_size` slots of `max_length` positions each (default: the
    model's context), or as many slots as `kv_cache_memory` (e.g. "2GiB") allows. The KV
    cache is stored in `kv_cache_dtype`: "auto" is bfloat16 for int8 weights on a CPU with AMX
    (within 0.1% of float32's perplexity on SmolLM2, and faster there; without AMX bfloat16
    attention is slower), else the compute type's float type.
    On CPU the pool's memory is taken from the system only as positions are written.
    """

    def __init__(self, model: str | Path | LoadedModel | None = None, *,
                 max_batch_size: int | None = None, max_length: int | None = None,
                 kv_cache_memory: int | str | None = None, kv_cache_dtype: str = "auto",
                 max_prefill_tokens_per_step: int | None = None, seed: int | None = None,
                 static_decode: bool = True, draft_model: str | Path | LoadedModel | None = None,
                 draft_compute_type: str = "default", **load_options) -> None:
        self._check_options(max_batch_size, max_length, max_prefill_tokens_per_step, kv_cache_dtype)
        self.loaded = model if isinstance(model, LoadedModel) else open_model(model, **load_options)
        loaded = self.loaded
        self.kv_cache_dtype = self._kv_dtype(kv_cache_dtype)
        context = loaded.spec.max_position_embeddings
        slot_length = min(max_length or context, context)
        num_slots = self._num_slots(max_batch_size, kv_cache_memory, slot_length)
        self.pool = SlotPool(loaded.model.spec, num_slots, slot_length, self.kv_cache_dtype,
                             loaded.device)
        self.runner = ModelRunner(loaded.model, self.pool, loaded.device, static_decode)
        self.draft = None
        if draft_model is not None:
            self.draft = self._open_draft(draft_model, draft_compute_type, load_options,
                                          static_decode)
        self.builder = RequestBuilder(loaded.spec, loaded.config.tokens, loaded.vocabulary,
                                      str(loaded.path))
        self.max_prefill_tokens_per_step = (max_prefill_tokens_per_step
                                            or PREFILL_TOKENS_PER_STEP.get(loaded.device.type, 512))
        self._rng = torch.Generator(device=loaded.device)
        self._rng.manual_seed(seed if seed is not None else torch.seed())
        self._ids = itertools.count()
        self._lock = threading.RLock()  # guards the queues below (any thread)
        self._step_lock = threading.Lock()  # one step at a time
        self._progress = threading.Condition()
        self._steps_done = 0
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._aborted: set[int] = set()
        self._live: dict[int, _Sequence] = {}  # waiting or running
        self._finished: OrderedDict[int, _Sequence] = OrderedDict()
        self.on_work: Callable[[], None] | None = None  # AsyncEngine's wake-up
        self.speculation = SpeculationStats()

    # ------------------------------------------------------------ configuration

    @staticmethod
    def _check_options(max_batch_size, max_length, prefill_tokens, kv_cache_dtype) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_length", max_length),
                            ("max_prefill_tokens_per_step", prefill_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int (or None for the default), "
                                f"got {value!r}")
        if kv_cache_dtype not in ("auto", *KV_DTYPES):
            raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_DTYPES)}; got "
                            f"{kv_cache_dtype!r}")

    def _open_draft(self, draft_model, compute_type: str, load_options: dict,
                    static_decode: bool) -> DraftModel:
        device = self.loaded.device
        draft = draft_model if isinstance(draft_model, LoadedModel) else open_model(
            draft_model, device.type, compute_type, device_index=device.index or 0,
            cache_dir=load_options.get("cache_dir"))
        return DraftModel(draft, self.loaded, self.pool.num_slots, self.pool.slot_length,
                          self.kv_cache_dtype, static_decode)

    def _kv_dtype(self, name: str) -> torch.dtype:
        if name != "auto":
            return KV_DTYPES[name]
        compute = self.loaded.compute
        if self.loaded.device.type == "cpu" and compute.weights == "int8" and cpu_has_amx():
            return torch.bfloat16
        return compute.torch_dtype

    def _num_slots(self, max_batch_size: int | None, memory: int | str | None,
                   slot_length: int) -> int:
        per_slot = bytes_per_slot(self.loaded.model.spec, slot_length, self.kv_cache_dtype)
        if memory is None and self.loaded.device.type == "cuda":
            # At most half of what the weights left (the rest for activations and graphs).
            free, _ = torch.cuda.mem_get_info(self.loaded.device)
            fits = free // 2 // per_slot
            if fits < 1:
                raise OutOfMemory(f"one sequence of {slot_length} positions needs "
                                  f"{per_slot / 2**20:.0f} MiB of KV cache and {free / 2**20:.0f} "
                                  "MiB are free; lower max_length or use kv_cache_dtype='bfloat16'")
            return min(max_batch_size or DEFAULT_SLOTS, fits)
        if memory is None:
            return max_batch_size or DEFAULT_SLOTS
        budget = parse_memory(memory)
        slots = budget // per_slot
        if slots < 1:
            raise ValueError(f"kv_cache_memory={memory!r} is less than one sequence of "
                            f"{slot_length} positions needs ({per_slot / 2**20:.1f} MiB in "
                            f"{str(self.kv_cache_dtype).removeprefix('torch.')}); raise it or "
                            "lower max_length")
        return min(slots, max_batch_size or slots)

    # ------------------------------------------------------------ properties

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def max_length(self) -> int:
        """Positions per sequence: a request's prompt plus its new tokens must fit."""
        return self.pool.slot_length

    @property
    def max_batch_size(self) -> int:
        return self.pool.num_slots

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(len(self._waiting), len(self._running), self.pool.num_slots,
                               self.pool.used_count)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def warm_up(self, positions: int | None = None) -> None:
        """Capture the decode steps of every batch size for sequences of up to `positions`
        (default: 512, at most max_length) now, so that no stream waits for one later."""
        with self._step_lock, torch.inference_mode():
            self.runner.warm_up(min(positions or 512, self.max_length))

    # ------------------------------------------------------------ requests

    def search_for(self, request: Request, options: GenerationOptions, end_ids=None,
                   processors=None, row: int = 0) -> Search:
        """The search a request runs with: beam search, or greedy/sampled decoding with the
        request's own random stream (`seed`, made distinct per row of a batch)."""
        end_ids = self.builder.end_ids(options.end_token) if end_ids is None else end_ids
        processors = self.builder.processors(options) if processors is None else processors
        generator = self._rng
        if options.seed is not None:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(row_seed(options.seed, row))
        usable = self.spec.usable_vocab_size
        if options.beam_size > 1:
            return BeamSearch(request, options.beam, options.sampling, generator, end_ids,
                              options.return_end_token, processors, usable)
        drafted = (self.draft is not None and options.use_draft_model
                   and not options.prompt_lookup)
        speculating = options.prompt_lookup or drafted
        return TokenSearch(request, options.sampling, generator, end_ids, options.return_end_token,
                           processors, options.return_logits_vocab, options.length_penalty,
                           options.top_logprobs,
                           options.num_speculative_tokens if speculating else 0,
                           options.adaptive_speculation, drafted)

    def add_request(self, prompt: Sequence[int | str], options: GenerationOptions | None = None,
                    *, text: bool = False, skip_special_tokens: bool = True,
                    sink: Callable[[TokenEvent], None] | None = None, **option_kwargs) -> int:
        """Queue a prompt (token ids or strings); return the request's id. `options` (or
        keyword arguments, GenerationOptions' fields) apply to this request only. With
        `text=True` events carry the decoded text and `stop` strings apply (stop strings
        imply it). A request that cannot fit the engine is refused here with RequestError."""
        if options is None:
            options = GenerationOptions.from_kwargs(**option_kwargs)
        elif option_kwargs:
            options = options.replace(**option_kwargs)
        if options.return_alternatives:
            raise RequestError("return_alternatives is a generate_batch option; the engine "
                               "streams one sequence per request")
        prompt_ids = self.builder.check_batch([prompt])[0]
        request = self.builder.request(prompt_ids, options, self.builder.static_ids(options),
                                       self.max_length)
        stream = None
        if text or options.stop_strings:
            stream = TextStream(self.require_tokenizer(), prompt_ids, options.stop_strings,
                                skip_special_tokens)
        return self.submit(request, self.search_for(request, options), stream, sink,
                           options.cache_static_prompt)

    def submit(self, request: Request, search: Search, text: TextStream | None = None,
               sink: Callable[[TokenEvent], None] | None = None,
               cache_static_prompt: bool = True) -> int:
        """Queue a request built by `builder` with its search (see add_request)."""
        if search.rows > self.pool.num_slots:
            raise RequestError(f"beam_size={search.rows} needs {search.rows} cache slots but the "
                               f"engine has {self.pool.num_slots}; lower beam_size or raise "
                               "max_batch_size")
        if request.total_length > self.max_length:
            self.builder.check_fits(len(request.prompt_ids), request.max_new_tokens,
                                    self.max_length)
        sequence = _Sequence(next(self._ids), request, search, text, sink)
        sequence.save_static = bool(request.static_length and cache_static_prompt)
        with self._lock:
            self._waiting.append(sequence)
            self._live[sequence.id] = sequence
        self._wake()
        return sequence.id

    def abort(self, request_id: int) -> None:
        """Stop a request: it ends with finish_reason "abort" and its slots are free for the
        next step. Unknown or finished ids are ignored."""
        with self._lock:
            sequence = self._live.get(request_id)
            if sequence is None:
                return
            if sequence in self._waiting:
                self._waiting.remove(sequence)
                self._finish(sequence, "abort", [])
            else:
                self._aborted.add(request_id)
        if self._step_lock.acquire(blocking=False):  # no step under way: free the slots now
            try:
                with self._lock:
                    self._apply_aborts([])
            finally:
                self._step_lock.release()
        self._wake()
        self._notify()

    # ------------------------------------------------------------ stepping

    def step(self) -> list[TokenEvent]:
        """Run one step (admit, prefill chunks, one decode token for every running request)
        and return its events. A failure inside the step ends the requests in flight with
        that error (their events carry it) and leaves the engine usable."""
        with self._step_lock:
            try:
                with torch.inference_mode():
                    return self._step()
            finally:
                self._notify()

    def _step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        try:
            with self._lock:
                self._apply_aborts(events)
                self._admit()
                running = list(self._running)
            decoding = [s for s in running if s.prompt_done]
            prefilling = [s for s in running if not s.prompt_done]
            speculating = self._proposals(decoding)
            if speculating:
                verifying = {s.id for s, _, _ in speculating}
                decoding = [s for s in decoding if s.id not in verifying]
            decoded = self._run_decode(decoding) if decoding else None
            verified = self._run_verify(speculating) if speculating else []
            prefilled = self._run_prefill(prefilling) if prefilling else []
            self._advance(decoding, decoded, prefilled, events)
            self._advance_verified(verified, events)
        except Exception as error:  # noqa: BLE001 - any failure ends the requests in flight
            with self._lock:
                for sequence in list(self._running):
                    self._finish(sequence, "error", events, error=error)
        with self._lock:
            self._release_finished()
        return events

    def _apply_aborts(self, events: list[TokenEvent]) -> None:
        for sequence in list(self._running):
            if sequence.id in self._aborted:
                self._finish(sequence, "abort", events)
        self._aborted.clear()
        self._release_finished()

    def _admit(self) -> None:
        """First come, first served: admit while the oldest waiting request fits."""
        while self._waiting:
            sequence = self._waiting[0]
            slots = self.pool.allocate(sequence.search.rows)
            if slots is None:
                return
            self._waiting.popleft()
            sequence.slots = slots
            request = sequence.request
            if sequence.save_static:
                key = tuple(request.prompt_ids[: request.static_length])
                if key in self.runner.static_prompts:
                    self.runner.static_prompts.load(key, self.pool.cache, slots[0])
                    sequence.computed = request.static_length
                    self.pool.lengths[slots[0]] = sequence.computed
                    sequence.save_static = False
            self._running.append(sequence)

    def _run_decode(self, sequences: list[_Sequence]) -> torch.Tensor:
        """One decode step for the sequences; their logits, rows in sequence order."""
        rows = [(slot, token, sequence.computed) for sequence in sequences
                for slot, token in zip(sequence.slots, sequence.inputs, strict=True)]
        logits = self.runner.decode(rows)
        for sequence in sequences:
            sequence.computed += 1
            for slot in sequence.slots:
                self.pool.lengths[slot] = sequence.computed
        return logits

    def _proposals(self, sequences: list[_Sequence]
                   ) -> list[tuple[_Sequence, list[int], torch.Tensor | None]]:
        """Proposals of the speculating requests (prompt lookup or the draft model), with the
        draft's distributions for sampled requests: never more than the request may still
        generate minus the token verification adds itself."""
        found, drafting = [], []
        for sequence in sequences:
            search = sequence.search
            if not isinstance(search, TokenSearch) or not search.speculative_tokens:
                continue
            count = min(search.speculative_tokens,
                        sequence.request.max_new_tokens - search.steps - 1)
            if count < 1:
                continue
            history = sequence.request.prompt_ids + search.row.tokens
            if search.drafted:
                drafting.append(DraftRequest(
                    sequence.slots[0], history[sequence.draft_computed:sequence.computed + 1],
                    sequence.draft_computed, count, search.sampling, search.generator))
                found.append((sequence, None, None))
                continue
            proposals = lookup_proposals(history, count)
            if proposals:
                found.append((sequence, proposals, None))
        if drafting:
            drafted = iter(self.draft.propose(drafting))
            found = [(s, *next(drafted)) if proposals is None else (s, proposals, q)
                     for s, proposals, q in found]
            for sequence, proposals, _ in found:
                if sequence.search.drafted:  # its cache now holds the input and k-1 proposals
                    sequence.draft_computed = sequence.computed + len(proposals)
        return found

    def _run_verify(self, items: list[tuple[_Sequence, list[int], torch.Tensor | None]]
                    ) -> list[tuple[_Sequence, list[int], torch.Tensor | None, torch.Tensor]]:
        rows = [(s.slots[0], token, s.computed + offset) for s, proposals, _ in items
                for offset, token in enumerate([s.inputs[0], *proposals])]
        logits = self.runner.verify(rows)
        verified, first = [], 0
        for sequence, proposals, q in items:
            verified.append((sequence, proposals, q, logits[first:first + len(proposals) + 1]))
            first += len(proposals) + 1
        return verified

    def _advance_verified(self, verified: list, events: list[TokenEvent]) -> None:
        """Accept proposals; the slot advances past the accepted ones and the target's own
        token, so rejected positions are simply written over later."""
        stats = self.speculation
        for sequence, proposals, q, logits in verified:
            decision, emitted, accepted = verify(sequence.search, logits, proposals,
                                                 self.spec.usable_vocab_size, q)
            sequence.computed += emitted
            sequence.draft_computed = min(sequence.draft_computed, sequence.computed)
            self.pool.lengths[sequence.slots[0]] = sequence.computed
            stats.verify_passes += 1
            stats.proposed += len(proposals)
            stats.accepted += accepted
            stats.emitted += emitted
            search = sequence.search
            if search.adaptive_speculation:  # longer runs while they are accepted
                search.speculative_tokens = (
                    min(search.speculative_tokens + 2, MAX_SPECULATIVE_TOKENS)
                    if accepted == len(proposals) else max(search.speculative_tokens - 1, 1))
            with self._lock:
                self._apply(sequence, decision, events)

    def _run_prefill(self, sequences: list[_Sequence]) -> list[tuple[_Sequence, torch.Tensor]]:
        remaining = []
        for sequence in sequences:
            left = len(sequence.request.prompt_ids) - sequence.computed
            if sequence.save_static:  # stop at the static prompt's end to store its state
                left = min(left, sequence.request.static_length - sequence.computed)
            remaining.append(left)
        sizes = plan_prefill(remaining, self.max_prefill_tokens_per_step)
        chosen = [(s, size) for s, size in zip(sequences, sizes, strict=True) if size]
        chunks = [Chunk(s.slots[0], s.request.prompt_ids[s.computed:s.computed + size],
                        s.computed, s.search.all_logits) for s, size in chosen]
        outputs = self.runner.prefill(chunks)
        ready = []
        for (sequence, size), chunk, output in zip(chosen, chunks, outputs, strict=True):
            sequence.computed += size
            self.pool.lengths[chunk.slot] = sequence.computed
            if sequence.search.all_logits:
                sequence.search.add_chunk(chunk.start, output)
            if sequence.save_static and sequence.computed == sequence.request.static_length:
                key = tuple(sequence.request.prompt_ids[: sequence.computed])
                self.runner.static_prompts.save(key, self.pool.cache, chunk.slot)
                sequence.save_static = False
            if sequence.prompt_done:
                ready.append((sequence, output[-1:]))
        return ready

    def _advance(self, decoding: list[_Sequence], decoded: torch.Tensor | None,
                 prefilled: list[tuple[_Sequence, torch.Tensor]], events: list[TokenEvent]) -> None:
        """Each request's search picks its next tokens; report them; finish what is done.
        `decoded`: the decode step's logits, rows in the order of `decoding`'s rows."""
        ready, offset = [], 0  # (sequence, its first row in `decoded`)
        for sequence in decoding:
            ready.append((sequence, offset))
            offset += len(sequence.slots)
        decisions = []
        tokens = [(s, row) for s, row in ready if isinstance(s.search, TokenSearch)]
        if tokens:  # all rows of the step at once; usually the whole block, no copy
            block = decoded if len(tokens) == decoded.shape[0] else decoded[
                torch.tensor([row for _, row in tokens], device=decoded.device)]
            decisions += zip([s for s, _ in tokens], choose_for(
                [s.search for s, _ in tokens], block, self.spec.usable_vocab_size), strict=True)
        first = [(s, logits) for s, logits in prefilled if isinstance(s.search, TokenSearch)]
        if first:
            decisions += zip([s for s, _ in first], choose_for(
                [s.search for s, _ in first], torch.cat([logits for _, logits in first]),
                self.spec.usable_vocab_size), strict=True)
        decisions += [(s, s.search.advance(decoded[row:row + len(s.slots)])) for s, row in ready
                      if not isinstance(s.search, TokenSearch)]
        decisions += [(s, s.search.advance(logits)) for s, logits in prefilled
                      if not isinstance(s.search, TokenSearch)]
        with self._lock:
            for sequence, decision in decisions:
                self._apply(sequence, decision, events)

    def _apply(self, sequence: _Sequence, decision: Decision, events: list[TokenEvent]) -> None:
        if sequence.finish_reason is not None:  # aborted meanwhile by another thread
            return
        if decision.sources is not None:
            self._reorder(sequence, decision.sources)
        sequence.inputs = decision.inputs
        reason = decision.finish_reason
        new_events = []
        for index, (token, log_prob) in enumerate(decision.tokens):
            text = ""
            if sequence.text is not None:
                text = sequence.text.add(token)
            top = decision.tops[index] if decision.tops else None
            new_events.append(TokenEvent(sequence.id, token, text, log_prob, sequence.reported,
                                         top_log_probs=top))
            sequence.reported += 1
            if sequence.text is not None and sequence.text.stopped:
                reason = "stop"
                break
        if reason is not None:
            if not new_events:
                new_events.append(TokenEvent(sequence.id, None, index=sequence.reported))
            if sequence.text is not None:
                new_events[-1].text += sequence.text.finish()
            new_events[-1].finish_reason = reason
        self._emit(sequence, new_events, events)
        if reason is not None:
            self._finish(sequence, reason, events, emitted=True)

    def _reorder(self, sequence: _Sequence, sources: list[int]) -> None:
        """Row k continues old row sources[k]: copy the slots' filled positions accordingly."""
        pairs = [(sequence.slots[source], slot)
                 for source, slot in zip(sources, sequence.slots, strict=True)
                 if sequence.slots[source] != slot]
        if pairs:
            self.pool.cache.copy_slots([a for a, _ in pairs], [b for _, b in pairs],
                                       sequence.computed)
            for slot in sequence.slots:
                self.pool.lengths[slot] = sequence.computed

    def _emit(self, sequence: _Sequence, new: list[TokenEvent], events: list[TokenEvent]) -> None:
        for event in new:
            events.append(event)
            if sequence.sink is not None:
                try:
                    sequence.sink(event)
                except Exception:  # noqa: BLE001 - a consumer gone (closed loop) is not the engine's failure
                    pass
            else:
                sequence.events.append(event)

    def _finish(self, sequence: _Sequence, reason: str, events: list[TokenEvent],
                error: BaseException | None = None, emitted: bool = False) -> None:
        """End a request (under _lock): its slots are released at the end of the step."""
        if sequence.finish_reason is not None:
            return
        if not emitted:
            tail = sequence.text.finish() if sequence.text is not None and error is None else ""
            self._emit(sequence, [TokenEvent(sequence.id, None, tail, index=sequence.reported,
                                             finish_reason=reason, error=error)], events)
        sequence.finish_reason, sequence.error = reason, error
        self._live.pop(sequence.id, None)
        self._finished[sequence.id] = sequence
        while len(self._finished) > UNCLAIMED_OUTPUTS:
            self._finished.popitem(last=False)

    def _release_finished(self) -> None:
        """Give back the slots of finished requests and keep the used slots dense."""
        done = [s for s in self._running if s.finish_reason is not None]
        if not done:
            return
        self._running = [s for s in self._running if s.finish_reason is None]
        for sequence in done:
            self.pool.release(sequence.slots)
            sequence.slots = []
        owners = {slot: sequence for sequence in self._running for slot in sequence.slots}
        for source, destination in self.pool.compaction_moves():
            sequence = owners.pop(source)
            if self.draft is not None:
                self.draft.move(source, destination, sequence.draft_computed)
            sequence.slots = [destination if slot == source else slot for slot in sequence.slots]
            owners[destination] = sequence

    # ------------------------------------------------------------ consuming

    def stream(self, request_id: int) -> Iterator[TokenEvent]:
        """The request's events as they come, stepping the engine as needed. Leaving the
        loop early aborts the request; an error inside a step is raised here."""
        sequence = self._sequence(request_id)
        finished = False
        try:
            while True:
                self._drive(lambda: bool(sequence.events))
                while sequence.events:
                    event = sequence.events.popleft()
                    if event.error is not None:
                        finished = True
                        raise event.error
                    yield event
                    if event.finish_reason is not None:
                        finished = True
                        return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._finished.pop(request_id, None)

    def wait(self, request_ids: Iterable[int]) -> list[RequestOutput]:
        """Step until every given request has finished; their outputs, in order. A request
        that failed raises its error."""
        sequences = [self._sequence(request_id) for request_id in request_ids]
        try:
            self._drive(lambda: all(s.finish_reason is not None for s in sequences)
                        or any(s.error is not None for s in sequences))
        finally:  # on an error (or an interrupt) the others stop too
            for sequence in sequences:
                if sequence.finish_reason is None:
                    self.abort(sequence.id)
        return [self._output(sequence) for sequence in sequences]

    def result(self, request_id: int) -> RequestOutput:
        return self.wait([request_id])[0]

    def poll(self, request_ids: Iterable[int]) -> list[TokenEvent]:
        """Step until one of the requests has events; all their queued events, in order.
        Finished requests stay readable with `wait`/`result`."""
        sequences = [self._sequence(request_id) for request_id in request_ids]
        self._drive(lambda: any(s.events for s in sequences))
        events = []
        for sequence in sequences:
            while sequence.events:
                events.append(sequence.events.popleft())
        return events

    def release(self, request_id: int) -> None:
        """Forget a finished request's output (stream() does this itself)."""
        with self._lock:
            self._finished.pop(request_id, None)

    def _output(self, sequence: _Sequence) -> RequestOutput:
        with self._lock:
            self._finished.pop(sequence.id, None)
        if sequence.error is not None:
            raise sequence.error
        text = sequence.text.text[: sequence.text.released] if sequence.text is not None else None
        return RequestOutput(sequence.id, sequence.request, sequence.search,
                             sequence.finish_reason, text)

    def _sequence(self, request_id: int) -> _Sequence:
        with self._lock:
            sequence = self._live.get(request_id) or self._finished.get(request_id)
        if sequence is None:
            raise RequestError(f"no request {request_id} in this engine (finished requests are "
                               "kept until their result is read)")
        return sequence

    def _drive(self, done: Callable[[], bool]) -> None:
        """Step until `done()`: step ourselves when no other thread is stepping, else wait for
        its step to end and look again."""
        while not done():
            with self._progress:
                seen = self._steps_done
            if self._step_lock.acquire(blocking=False):
                self._step_lock.release()
                if not done():
                    if not self.has_work():
                        raise KilnError("the engine has no work left but a request is not done")
                    self.step()
                continue
            with self._progress:
                if self._steps_done == seen and not done():
                    self._progress.wait(timeout=1.0)

    def _notify(self) -> None:
        with self._progress:
            self._steps_done += 1
            self._progress.notify_all()

    def _wake(self) -> None:
        if self.on_work is not None:
            self.on_work()

    def require_tokenizer(self):
        if self.loaded.tokenizer is None:
            raise RequestError(f"{self.loaded.path} has no tokenizer.json, so text cannot be "
                               "encoded; pass token ids to generate_batch instead")
        return self.loaded.tokenizer


def cpu_has_amx() -> bool:
    """AMX tiles: bfloat16 attention is faster than float32 only with them (measured: Intel
    Xeon with AMX 17-31% faster decoding, AMD EPYC with AVX-512 BF16 but no AMX 2x slower)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def row_seed(seed: int, row: int) -> int:
    """Row 0 uses the seed itself (so one prompt gives the same tokens alone or in a batch);
    other rows of a call get seeds of their own, derived from it (splitmix64)."""
    if row == 0:
        return seed
    value = (seed + row * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (value ^ (value >> 31)) & 0x7FFFFFFFFFFFFFFF
