"""ModelRunner: runs a StepPlan on the model and its KV cache, and nothing else.

Three kinds of forward pass, all in terms of slots:
- decode: one token for each given slot. The pass runs over cache rows 0..high-1 (the
  scheduler keeps used slots dense), rows without a token are padding that writes to the
  scratch column; int8 activations in one 8-bit pass per token. With `static_decode` it is
  captured once and replayed (static_step.py).
- verify: speculative verification, each token as a decode row of its slot (several rows may
  share a slot), so accepted tokens are exactly those decoding would choose.
- prefill: prompt chunks of several sequences packed into one pass without padding; the
  projections run on all their tokens at once, attention chunk by chunk; int8 activations in
  two passes (~16 bits).

A row's numerics depend on the kind of pass, never on which other rows share it: every int8
kernel quantizes per row (integer products are exact), decode attention computes each row on
its own, a prompt chunk's attention has the same shapes alone or beside others (the scheduler
cuts prompts at fixed boundaries), and attention always reads whole KV_BUCKET column blocks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import OutOfMemory
from ..model.decoder import Span
from ..model.kv_cache import KVCache
from .scheduler import PrefillChunk, Row, SlotMove, StepPlan
from .slots import copy_moves
from .static_step import (
    StaticDecodeStep,
    batch_bucket,
    default_capture,
    kv_bucket,
    read_bucket,
)

STATIC_PROMPT_STATES = 8  # static prompts whose keys/values are kept (CTranslate2: unbounded)


@dataclass
class StepOutput:
    """Logits of a step: decode rows [n, V] in the plan's decode_rows() order, verify rows
    [m, V] in verify_rows() order, and per prefill chunk the logits [1, V] of its last token
    when it completes a prompt ([T, V] of every token for scoring), else None."""

    decode: torch.Tensor | None = None
    verify: torch.Tensor | None = None
    prefill: list[torch.Tensor | None] | None = None


class StaticPromptStates:
    """Keys and values of recent static prompts (a bounded LRU), copied into a slot instead of
    being computed again."""

    def __init__(self, capacity: int = STATIC_PROMPT_STATES) -> None:
        self.capacity = capacity
        self._states: OrderedDict[tuple[int, ...], tuple[list, list]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._states

    def clear(self) -> None:
        self._states.clear()

    def save(self, key: tuple[int, ...], cache: KVCache, slot: int) -> None:
        length = len(key)
        self._states[key] = ([keys[slot, :, :length].clone() for keys in cache.keys],
                             [values[slot, :, :length].clone() for values in cache.values])
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def load(self, key: tuple[int, ...], cache: KVCache, slot: int) -> None:
        self._states.move_to_end(key)
        stored_keys, stored_values = self._states[key]
        length = len(key)
        for layer_keys, layer_values, keys, values in zip(cache.keys, cache.values, stored_keys,
                                                          stored_values, strict=True):
            layer_keys[slot, :, :length] = keys
            layer_values[slot, :, :length] = values


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: KVCache, device: torch.device,
                 static_decode: bool = True) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.static_decode = static_decode
        self.static_prompts = StaticPromptStates()
        self._static_step: StaticDecodeStep | None = None
        self.forward_seconds = 0.0  # time inside the model's forward passes (host time: the rest)

    # ------------------------------------------------------------ a whole step

    def execute(self, plan: StepPlan) -> StepOutput:
        """Run a plan's passes (the compaction moves are applied by `apply_moves` first)."""
        for sequence in plan.static_loads:
            key = tuple(sequence.request.prompt_ids[: sequence.request.static_length])
            self.static_prompts.load(key, self.cache, sequence.slots[0])
        output = StepOutput()
        if plan.decode:
            output.decode = self.decode(plan.decode_rows())
        if plan.verify:
            output.verify = self.verify(plan.verify_rows())
        if plan.prefill:
            output.prefill = self.prefill(plan.prefill)
            for chunk in plan.prefill:
                if chunk.save_static:
                    key = tuple(chunk.sequence.request.prompt_ids[: chunk.end])
                    self.static_prompts.save(key, self.cache, chunk.slot)
        return output

    def apply_moves(self, moves: list[SlotMove]) -> None:
        copy_moves(self.cache, [(m.source, m.destination, m.length) for m in moves])

    def copy_rows(self, sources: list[int], destinations: list[int], length: int) -> None:
        """Beam search: rows continue other rows' hypotheses (their filled positions copied)."""
        self.cache.copy_slots(sources, destinations, length)

    # ------------------------------------------------------------ captured decode steps

    def static_step(self) -> StaticDecodeStep | None:
        if not self.static_decode:
            return None
        if self._static_step is None:
            capture = default_capture(self.device)
            if getattr(self.model, "int8_backend", None) == "onednn":
                capture = None  # its op takes a list of optional scalars, which tracing refuses
            if getattr(self.model, "shard", None) is not None:
                capture = None  # all-reduces between ranks: eager steps at the same shapes
            self._static_step = StaticDecodeStep(self.model, capture)
        return self._static_step

    def warm_up(self, positions: int, rows: int | None = None) -> None:
        """Capture the decode steps now: on CPU the one trace that serves every shape; on
        CUDA a graph per batch bucket of up to `rows` rows (default: every slot) for
        sequences of up to `positions`."""
        static = self.static_step()
        if static is None or static.capture is None:  # eager steps: nothing to capture
            return
        slots = self.cache.num_slots
        buckets = sorted({min(batch_bucket(count), slots) for count in range(1, (rows or slots) + 1)})
        limit = min(positions, self.cache.max_length)
        for kv_length in range(256, limit + 256, 256):
            for count in buckets:
                static.build(count, kv_length, self.cache)
                if static.capture == "trace":
                    return  # one trace serves every shape

    # ------------------------------------------------------------ passes

    def decode(self, rows: list[Row]) -> torch.Tensor:
        """Logits [len(rows), V] for rows of (slot, token, position)."""
        cache = self.cache
        static = self.static_step()
        width = max(slot for slot, _, _ in rows) + 1
        if static is not None and static.capture != "trace":  # padded here to the bucket
            width = min(batch_bucket(width), cache.num_slots)
        ids = [0] * width
        positions = [cache.scratch_position] * width
        for slot, token, position in rows:
            ids[slot], positions[slot] = token, position
        kv_length = kv_bucket(max(position for _, _, position in rows) + 1, cache.max_length,
                              read_bucket(self.device))
        ids_tensor = torch.tensor(ids, device=self.device)
        positions_tensor = torch.tensor(positions, device=self.device)
        began = time.perf_counter()
        with _memory_errors("a decode step", len(rows)):
            if static is not None:
                logits = static.step(ids_tensor, positions_tensor, cache, kv_length)
            else:
                logits = self.model(ids_tensor.unsqueeze(1), positions_tensor.unsqueeze(1), cache,
                                    kv_length=kv_length, decode=True)[:, -1]
        self.forward_seconds += time.perf_counter() - began
        slots = [slot for slot, _, _ in rows]
        if slots == list(range(len(slots))):
            return logits[: len(slots)]
        return logits[torch.tensor(slots, device=self.device)]

    def verify(self, rows: list[Row]) -> torch.Tensor:
        """Speculative verification: logits [len(rows), V] for rows of (slot, token, position)
        where a slot may appear several times (a sequence's last token and its proposals at
        consecutive positions). Each token runs as its own decode row, the way a decode step
        would run it (one query, int8 activations in one pass); within each layer every row
        writes its keys and values before any row attends, so a proposal sees the ones
        before it. The logits of a position are those decoding would compute: accepted
        tokens are exactly the ones decoding would have chosen."""
        cache = self.cache
        slots = torch.tensor([slot for slot, _, _ in rows], device=self.device)
        ids = torch.tensor([token for _, token, _ in rows], device=self.device)
        positions = torch.tensor([position for _, _, position in rows], device=self.device)
        kv_length = kv_bucket(max(position for _, _, position in rows) + 1, cache.max_length,
                              read_bucket(self.device))
        static = self.static_step()
        began = time.perf_counter()
        with _memory_errors("a verification step", len(rows)):
            if static is not None:
                logits = static.step(ids, positions, cache, kv_length, slots=slots)
            else:
                logits = self.model(ids.unsqueeze(1), positions.unsqueeze(1), cache,
                                    kv_length=kv_length, slots=slots, decode=True)[:, -1]
        self.forward_seconds += time.perf_counter() - began
        return logits

    def prefill(self, chunks: list[PrefillChunk] | list[tuple[int, list[int], int, bool]]
                ) -> list[torch.Tensor | None]:
        """Run prompt chunks packed into one pass: PrefillChunks, or (slot, tokens, start,
        wants_logits) tuples. Per chunk, the logits [1, V] of its last token if it completes
        its prompt (or wants them), [T, V] of all its tokens for scoring chunks, else None."""
        items = [(c.slot, c.tokens, c.start, c.completes_prompt, c.all_logits)
                 if isinstance(c, PrefillChunk) else (*c, False) for c in chunks]
        ids, positions, slots, spans, logits_at, taken = [], [], [], [], [], []
        for slot, tokens, start, wants_last, all_logits in items:
            begin = len(ids)
            ids += tokens
            positions += range(start, start + len(tokens))
            slots += [slot] * len(tokens)
            spans.append(Span(begin, len(ids), slot,
                              kv_bucket(start + len(tokens), self.cache.max_length,
                                        read_bucket(self.device))))
            if all_logits:
                taken.append((len(logits_at), len(tokens)))
                logits_at += range(begin, len(ids))
            elif wants_last:
                taken.append((len(logits_at), 1))
                logits_at.append(len(ids) - 1)
            else:
                taken.append(None)
        device = self.device
        inputs = (torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                  torch.tensor(slots, device=device), spans, self.cache,
                  torch.tensor(logits_at, dtype=torch.long, device=device))
        began = time.perf_counter()
        with _memory_errors("a prompt chunk", len(ids)):
            logits = self.model.prefill(*inputs)
        self.forward_seconds += time.perf_counter() - began
        return [None if where is None else logits[where[0]:where[0] + where[1]]
                for where in taken]


class _memory_errors:
    """torch.OutOfMemoryError inside a forward pass -> OutOfMemory saying what to lower."""

    def __init__(self, what: str, rows: int) -> None:
        self.what, self.rows = what, rows

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None and issubclass(kind, torch.OutOfMemoryError):
            raise OutOfMemory(
                f"out of memory running {self.what} of {self.rows} tokens: lower "
                "max_prefill_tokens_per_step or max_batch_size, or use an int8 compute "
                "type") from error
        return False
