"""The translation engine's self-attention cache: per decoder layer, keys and values
[rows, heads, length, head_dim], one row (slot) per live decoder row. Each row writes its new
keys at its own positions, so rows of requests that started at different times decode in one
pass; a row reads its slot up to the step's length, with the columns past its position
masked. The pool grows (rows and length) between steps when admissions need more."""

from __future__ import annotations

import torch


class SlotPool:
    def __init__(self, layers: int, heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.dtype, self.device = dtype, device
        self.rows = self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def reserve(self, rows: int, length: int) -> None:
        """At least `rows` slots of `length` positions (existing contents kept)."""
        if rows <= self.rows and length <= self.length:
            return
        rows, length = max(rows, self.rows), max(length, self.length)
        shape = (rows, self.heads, length, self.head_dim)

        def grown(old: torch.Tensor | None) -> torch.Tensor:
            # zeros: a masked weight is exactly 0, but 0 * NaN garbage would be NaN
            new = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if old is not None:
                new[:old.shape[0], :, :old.shape[2]] = old
            return new

        old_keys = self.keys or [None] * self.layers
        old_values = self.values or [None] * self.layers
        self.keys = [grown(old) for old in old_keys]
        self.values = [grown(old) for old in old_values]
        self.rows, self.length = rows, length

    def copy(self, sources: list[int], destinations: list[int], length: int) -> None:
        """Beams: rows continue other rows' hypotheses (their first `length` positions)."""
        moves = [(s, d) for s, d in zip(sources, destinations, strict=True) if s != d]
        if not moves:
            return
        sources, destinations = [s for s, _ in moves], [d for _, d in moves]
        source = torch.tensor(sources, device=self.device)
        destination = torch.tensor(destinations, device=self.device)
        for tensor in self.keys + self.values:
            view = tensor[:, :, :length]
            view.index_copy_(0, destination, view.index_select(0, source))

    def views(self, slots: list[int], positions: torch.Tensor, read: int,
              uniform: bool = False) -> list[LayerSlots]:
        """Each layer's view for a pass: rows in `slots`, their tokens at `positions` [B, T],
        attending over columns 0..read-1 (those past a token's position masked). `uniform`:
        every row has its tokens at the same positions."""
        slot_tensor = torch.tensor(slots, device=self.device)
        length = positions.shape[1]
        if uniform and length == 1:
            # one token per row, all at one position (one call's sentences): every column up
            # to it is valid, so no mask (SDPA's fastest path)
            read, mask = int(positions[0, 0]) + 1, None
        else:
            columns = torch.arange(read, device=self.device).view(1, 1, -1)
            mask = (columns <= positions.unsqueeze(-1)).unsqueeze(1)  # [B, 1, T, read]
        dense = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = slice(slots[0], slots[0] + len(slots)) if dense else slot_tensor
        return [LayerSlots(keys, values, slot_tensor, rows, positions, read, mask)
                for keys, values in zip(self.keys, self.values, strict=True)]


class LayerSlots:
    def __init__(self, keys, values, slots, rows, positions, read, mask) -> None:
        self.keys, self.values, self.slots, self.rows = keys, values, slots, rows
        self.positions, self.read, self.mask = positions, read, mask

    def store(self, k: torch.Tensor, v: torch.Tensor):
        """Write the pass's keys/values [B, H, T, D] at the rows' positions; return every
        column the rows attend over, and the mask."""
        where = (self.slots[:, None], slice(None), self.positions)
        self.keys[where] = k.transpose(1, 2).to(self.keys.dtype)
        self.values[where] = v.transpose(1, 2).to(self.values.dtype)
        read = slice(0, self.read)
        return (self.keys[self.rows, :, read].to(k.dtype),
                self.values[self.rows, :, read].to(v.dtype), self.mask)
