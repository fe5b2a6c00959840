"""ModelRunner: the model, its KV slot pool, static decode steps and static-prompt states.

Two operations, both in terms of slots:
- `prefill(chunks)`: prompt chunks (a slot, tokens, their first position) run packed as one
  right-padded batch; int8 activations in two passes (~16 bits).
- `decode(rows)`: one token for each given slot. The step runs over cache rows 0..high-1
  (the pool keeps used slots dense), rows without a token are padding that writes to the
  scratch column; int8 activations in one 8-bit pass per token. With `static_decode` the
  step runs at bucketed shapes, captured once (a CUDA graph, a CPU trace) and replayed for
  the engine's whole life: the cache never changes, so neither do the captures.

A row's numerics depend on whether it is a prompt or a decode token, never on which other
rows share the forward pass: every int8 kernel quantizes per row (integer products are
exact), and attention always reads whole KV_BUCKET column blocks (the cache is sized in
them), so its vectorized sums see the same blocks whatever the longest row of the batch.
A request's tokens are the same alone or batched.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import OutOfMemory
from .slots import SlotPool
from .static_step import KV_BUCKET, StaticDecodeStep, batch_bucket, default_capture, kv_bucket

STATIC_PROMPT_STATES = 8  # static prompts whose keys/values are kept (CTranslate2: unbounded)


@dataclass
class Chunk:
    slot: int
    tokens: list[int]
    start: int  # cache position of tokens[0]
    all_logits: bool = False  # logits of every position (scoring), else of the last only


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

    def save(self, key: tuple[int, ...], cache, slot: int) -> None:
        length = len(key)
        self._states[key] = ([keys[slot, :, :length].clone() for keys in cache.keys],
                             [values[slot, :, :length].clone() for values in cache.values])
        while len(self._states) > self.capacity:
            self._states.popitem(last=False)

    def load(self, key: tuple[int, ...], cache, slot: int) -> None:
        self._states.move_to_end(key)
        stored_keys, stored_values = self._states[key]
        length = len(key)
        for layer_keys, layer_values, keys, values in zip(cache.keys, cache.values, stored_keys,
                                                          stored_values, strict=True):
            layer_keys[slot, :, :length] = keys
            layer_values[slot, :, :length] = values


class ModelRunner:
    def __init__(self, model: torch.nn.Module, pool: SlotPool, device: torch.device,
                 static_decode: bool = True) -> None:
        self.model, self.pool, self.device = model, pool, device
        self.static_decode = static_decode
        self.static_prompts = StaticPromptStates()
        self._static_step: StaticDecodeStep | None = None

    @property
    def cache(self):
        return self.pool.cache

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

    def warm_up(self, positions: int) -> None:
        """Capture the decode step of every batch bucket for sequences of up to `positions`."""
        static = self.static_step()
        if static is None:
            return
        buckets = sorted({min(batch_bucket(rows), self.pool.num_slots)
                          for rows in range(1, self.pool.num_slots + 1)})
        for kv_length in range(KV_BUCKET, min(positions, self.cache.max_length) + KV_BUCKET,
                               KV_BUCKET):
            for rows in buckets:
                static.build(rows, kv_length, self.cache)

    def decode(self, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        """Logits [len(rows), V] for rows of (slot, token, position)."""
        cache = self.cache
        static = self.static_step()
        width = max(slot for slot, _, _ in rows) + 1
        if static is not None:  # padded here to the step's bucket, so nothing is copied there
            width = min(batch_bucket(width), cache.num_slots)
        ids = [0] * width
        positions = [cache.scratch_position] * width
        for slot, token, position in rows:
            ids[slot], positions[slot] = token, position
        kv_length = kv_bucket(max(position for _, _, position in rows) + 1, cache.max_length)
        ids_tensor = torch.tensor(ids, device=self.device)
        positions_tensor = torch.tensor(positions, device=self.device)
        with _memory_errors("a decode step", len(rows)):
            if static is not None:
                logits = static.step(ids_tensor, positions_tensor, cache, kv_length)
            else:
                logits = self.model(ids_tensor.unsqueeze(1), positions_tensor.unsqueeze(1), cache,
                                    kv_length=kv_length, decode=True)[:, -1]
        slots = [slot for slot, _, _ in rows]
        if slots == list(range(len(slots))):
            return logits[: len(slots)]
        return logits[torch.tensor(slots, device=self.device)]

    def prefill(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        """Run prompt chunks; for each, the logits [1, V] of its last token or, for
        all_logits chunks, [T, V] of all of them. Chunks of both kinds run in separate passes."""
        results: list[torch.Tensor | None] = [None] * len(chunks)
        for all_logits in (False, True):
            group = [index for index, chunk in enumerate(chunks) if chunk.all_logits == all_logits]
            if group:
                outputs = self._run_packed([chunks[index] for index in group], all_logits)
                for index, output in zip(group, outputs, strict=True):
                    results[index] = output
        return results

    def verify(self, rows: list[tuple[int, int, int]]) -> torch.Tensor:
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
        kv_length = kv_bucket(max(position for _, _, position in rows) + 1, cache.max_length)
        static = self.static_step()
        with _memory_errors("a verification step", len(rows)):
            if static is not None:
                return static.step(ids, positions, cache, kv_length, slots=slots)
            return self.model(ids.unsqueeze(1), positions.unsqueeze(1), cache,
                              kv_length=kv_length, slots=slots, decode=True)[:, -1]

    def _run_packed(self, chunks: list[Chunk], all_logits: bool) -> list[torch.Tensor]:
        cache = self.cache
        width = max(len(chunk.tokens) for chunk in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.full((len(chunks), width), cache.scratch_position, dtype=torch.long)
        for row, chunk in enumerate(chunks):
            tokens[row, : len(chunk.tokens)] = torch.tensor(chunk.tokens)
            positions[row, : len(chunk.tokens)] = torch.arange(chunk.start,
                                                               chunk.start + len(chunk.tokens))
        kv_length = kv_bucket(max(chunk.start + len(chunk.tokens) for chunk in chunks),
                              cache.max_length)
        slots = torch.tensor([chunk.slot for chunk in chunks], device=self.device)
        last = None if all_logits else torch.tensor(
            [len(chunk.tokens) - 1 for chunk in chunks], device=self.device)
        with _memory_errors("a prompt chunk", len(chunks) * width):
            logits = self.model(tokens.to(self.device), positions.to(self.device), cache,
                                kv_length=kv_length, slots=slots, last_index=last)
        if all_logits:
            return [logits[row, : len(chunk.tokens)] for row, chunk in enumerate(chunks)]
        return [logits[row:row + 1] for row in range(len(chunks))]


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
