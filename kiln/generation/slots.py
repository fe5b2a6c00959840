"""The slot pool: the engine's KV cache as a fixed set of sequence slots.

Sized once, when the engine starts, from `max_batch_size` x `max_length` or from a memory
budget; requests then take and give back slots, never memory. Used slots are kept dense
(0..used-1): when a request leaves a hole below the highest used slot, that slot's entries
move down into it (`compaction_moves`). A decode step then reads the first rows of the
cache as a view, with no gather of the keys and values per layer, and runs at the smallest
batch bucket.
"""

from __future__ import annotations

import heapq
import re

import torch

from ..errors import KilnError, OutOfMemory
from ..model.kv_cache import KVCache
from ..model.spec import ModelSpec
from .static_step import KV_BUCKET

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: int | str, what: str = "kv_cache_memory") -> int:
    """Bytes from an int or a string such as "2GiB", "512 MiB", "1.5GB"; `what` names the
    setting in the error."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{what} must be a positive number of bytes or a size such as "
                        f"'2GiB' or '512MB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def bytes_per_slot(spec: ModelSpec, slot_length: int, dtype: torch.dtype) -> int:
    """Keys and values of one slot, all layers (whole attention buckets, a scratch column)."""
    per_position = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype.itemsize
    return per_position * (_round_up(slot_length, KV_BUCKET) + 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class SlotTable:
    """Which of a fixed number of slots are free (lowest first) and how many positions each
    used one holds. Bookkeeping only: the scheduler plans with it without touching a model."""

    def __init__(self, num_slots: int, slot_length: int) -> None:
        self.slot_length = slot_length
        self._num_slots = num_slots
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots))  # a heap: the lowest free slot is taken first
        self._used: set[int] = set()

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return len(self._used)

    @property
    def high(self) -> int:
        """One past the highest used slot: decode steps run rows 0..high-1."""
        return max(self._used) + 1 if self._used else 0

    def allocate(self, count: int) -> list[int] | None:
        """`count` free slots, lowest first, or None when there are not enough."""
        if count > len(self._free):
            return None
        slots = [heapq.heappop(self._free) for _ in range(count)]
        for slot in slots:
            self._used.add(slot)
            self.lengths[slot] = 0
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            if slot not in self._used:
                raise KilnError(f"slot {slot} is not in use")
            self._used.remove(slot)
            self.lengths[slot] = 0
            heapq.heappush(self._free, slot)

    def compaction_plan(self) -> list[tuple[int, int, int]]:
        """Move the highest used slots into the lowest free ones until the used slots are
        0..used-1: (source, destination, positions to copy) in the order to copy them. The
        table is updated; the caller copies the entries and tells the slots' owners."""
        moves = []
        while self._free and self._used and self._free[0] < max(self._used):
            source, destination = max(self._used), heapq.heappop(self._free)
            length = self.lengths[source]
            self._used.remove(source)
            self._used.add(destination)
            self.lengths[destination], self.lengths[source] = length, 0
            heapq.heappush(self._free, source)
            moves.append((source, destination, length))
        return moves


class SlotPool(SlotTable):
    """A SlotTable with the KV cache it stands for."""

    def __init__(self, spec: ModelSpec, num_slots: int, slot_length: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        try:
            # Columns up to a multiple of KV_BUCKET: attention always reads whole buckets.
            self.cache = KVCache(spec, num_slots, _round_up(slot_length, KV_BUCKET), dtype, device)
        except torch.OutOfMemoryError as error:
            needed = num_slots * bytes_per_slot(spec, slot_length, dtype)
            raise OutOfMemory(
                f"out of memory allocating the KV cache: {num_slots} slots x {slot_length} "
                f"positions need {needed / 2**30:.2f} GiB on {device}; lower max_batch_size, "
                "max_length or kv_cache_memory, or use kv_cache_dtype='bfloat16'") from error
        super().__init__(num_slots, slot_length)

    def compaction_moves(self) -> list[tuple[int, int]]:
        """compaction_plan, with the entries copied here: (source, destination) pairs."""
        moves = self.compaction_plan()
        copy_moves(self.cache, moves)
        return [(source, destination) for source, destination, _ in moves]


def copy_moves(cache: KVCache, moves: list[tuple[int, int, int]]) -> None:
    """Copy each move's filled positions, in order (a later move may read an earlier one's
    destination)."""
    for source, destination, length in moves:
        if length:
            cache.copy_slots(torch.tensor([source]), torch.tensor([destination]), length)
