"""A preallocated KV cache organised as a pool of slots.

Each running sequence owns one slot and its own length. Keys and values are written by
absolute position, so prompts of different lengths need no left padding, beams copy slots,
and a server can put a new request in a free slot while others are mid-generation. Shapes
never change, which is what lets a decode step be replayed (CUDA graphs) later.

Every slot has one extra column past `max_length`: the scratch column where padding tokens
of a ragged batch write their (ignored) keys, so padding never overwrites a real entry.
"""

from __future__ import annotations

import math
import mmap

import torch

from .spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, num_slots: int, max_length: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        if num_slots < 1 or max_length < 1:
            raise ValueError(f"KVCache needs num_slots >= 1 and max_length >= 1, got "
                             f"{num_slots} and {max_length}")
        shape = (num_slots, spec.num_kv_heads, max_length + 1, spec.head_dim)
        # zeros, not empty: masked attention weights are exactly 0, but 0 * NaN garbage is NaN.
        self.keys = [_zeros(shape, dtype, device) for _ in range(spec.num_layers)]
        self.values = [_zeros(shape, dtype, device) for _ in range(spec.num_layers)]
        self.num_slots = num_slots
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def scratch_position(self) -> int:
        """Where padding tokens write; never read, because reads stop at max_length."""
        return self.max_length

    def copy_slots(self, source, destination, length: int | None = None) -> None:
        """Copy slots (their first `length` positions, default all) without recompute: beam
        search reorders hypotheses this way, the slot pool compacts itself."""
        source = torch.as_tensor(source, device=self.device)
        destination = torch.as_tensor(destination, device=self.device)
        columns = slice(None) if length is None else slice(0, length)
        for tensor in self.keys + self.values:
            view = tensor[:, :, columns]
            view.index_copy_(0, destination, view.index_select(0, source))


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Zeros. On CPU in an anonymous mapping: the system hands out zero pages only as they
    are written, so a pool sized for long sequences costs memory for what it holds. Without
    transparent huge pages: with them (numpy asks for them on large arrays; some systems use
    them everywhere) one write made 2 MiB resident, and every used slot cost its whole length
    (measured: 400 MB per slot for Pythia-410m, however short its sequence)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = math.prod(shape) * dtype.itemsize
    buffer = mmap.mmap(-1, max(size, 1))  # anonymous: zero-filled, lazily
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=size).view(dtype).view(shape)
