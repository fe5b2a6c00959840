"""Splitting a call's prompts into batches, by count or by tokens (CTranslate2's batch_type)."""

from __future__ import annotations

BATCH_TYPES = ("examples", "tokens")


def batches(lengths: list[int], max_batch_size: int, batch_type: str) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most max_batch_size prompts ("examples") or
    prompt tokens ("tokens"); 0 means one batch. A prompt longer than the limit goes alone."""
    if batch_type not in BATCH_TYPES:
        raise ValueError(f"batch_type must be one of {BATCH_TYPES}, got {batch_type!r}")
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 0:
        raise ValueError(f"max_batch_size must be an int >= 0 (0: no limit), got {max_batch_size!r}")
    if max_batch_size == 0:
        return [(0, len(lengths))]
    ranges, start, size = [], 0, 0
    for index, length in enumerate(lengths):
        cost = 1 if batch_type == "examples" else length
        if index > start and size + cost > max_batch_size:
            ranges.append((start, index))
            start, size = index, 0
        size += cost
    ranges.append((start, len(lengths)))
    return ranges
