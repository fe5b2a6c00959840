"""The reader of CTranslate2's binary model.bin: its variables and aliases, in place.

model.bin, little-endian: u32 binary_version, [str spec_name, u32 spec_revision] (version >= 2),
u32 num_variables, then per variable: str name, u8 rank, u32 dims[rank], then u8 dtype id and
u32 byte count (version >= 4; before: u8 item size and u32 element count), raw data; then
(version >= 3) u32 num_aliases and pairs of str. A str is a u16 length (with its NUL) + bytes.
The file is memory-mapped and tensors are views of it: a 24 GB file never needs 48 GB.
Files split into model-NN-of-MM.bin byte ranges are read as one stream.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelFileError

DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16,
          5: torch.bfloat16}
ITEM_SIZES = {4: torch.float32, 2: torch.int16, 1: torch.int8}  # binary versions < 4
MAX_BINARY_VERSION = 6


class ModelBin:
    """The variables of a model.bin, as zero-copy views of the mapped file(s)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self._maps, self._starts = [], []
        total = 0
        for path in paths:
            with open(path, "rb") as handle:
                size = path.stat().st_size
                self._maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
                                  if size else b"")
            self._starts.append(total)
            total += size
        self._size, self._cursor = total, 0
        self.variables: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self.aliases: dict[str, str] = {}
        self.touched: list[str] = []  # variables read since the last release_touched()
        self._parse()

    # -- reading the stream --------------------------------------------------------------------

    def _bytes(self, offset: int, count: int) -> bytes:
        if offset + count > self._size:
            raise ModelFileError(f"{self.paths[0]} is truncated or corrupt: {count} bytes needed at "
                                 f"offset {offset}, but the file has {self._size}")
        chunks = []
        for index, (start, data) in enumerate(zip(self._starts, self._maps, strict=True)):
            end = self._starts[index + 1] if index + 1 < len(self._starts) else self._size
            if offset < end and offset + count > start:
                low, high = max(offset, start) - start, min(offset + count, end) - start
                chunks.append(bytes(data[low:high]))
        return b"".join(chunks)

    def _read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        value = struct.unpack("<" + fmt, self._bytes(self._cursor, size))
        self._cursor += size
        return value[0] if len(value) == 1 else value

    def _string(self) -> str:
        length = self._read("H")
        raw = self._bytes(self._cursor, length)
        self._cursor += length
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError as error:
            raise ModelFileError(f"{self.paths[0]} is corrupt: a name at offset {self._cursor - length} "
                                 "is not UTF-8") from error

    def _parse(self) -> None:
        self.binary_version = self._read("I")
        if not 1 <= self.binary_version <= MAX_BINARY_VERSION:
            raise ValueError(f"{self.paths[0]} has binary version {self.binary_version}; kiln "
                             f"reads CTranslate2 model.bin versions 1 to {MAX_BINARY_VERSION}")
        self.spec_name, self.spec_revision = "", 1
        if self.binary_version >= 2:
            self.spec_name, self.spec_revision = self._string(), self._read("I")
        for _ in range(self._read("I")):
            name = self._string()
            rank = self._read("B")
            shape = [self._read("I") for _ in range(rank)]
            if self.binary_version >= 4:
                type_id, num_bytes = self._read("B"), self._read("I")
                if type_id not in DTYPES:
                    raise ModelFileError(f"{self.paths[0]}: variable {name!r} has unknown data type "
                                         f"{type_id} at offset {self._cursor - 5}")
                dtype = DTYPES[type_id]
            else:
                item_size, count = self._read("B"), self._read("I")
                if item_size not in ITEM_SIZES:
                    raise ModelFileError(f"{self.paths[0]}: variable {name!r} has item size {item_size}")
                dtype, num_bytes = ITEM_SIZES[item_size], count * item_size
            numel = 1
            for dim in shape:
                numel *= dim
            if numel * dtype.itemsize != num_bytes:
                raise ModelFileError(f"{self.paths[0]} is corrupt: variable {name!r} at offset "
                                     f"{self._cursor} claims {num_bytes} bytes for shape {shape}")
            self._bytes(self._cursor, num_bytes) if num_bytes < 64 else \
                self._bytes(self._cursor + num_bytes - 1, 1)  # bounds check without copying
            self.variables[name] = (dtype, shape, self._cursor, num_bytes)
            self._cursor += num_bytes
        if self.binary_version >= 3:
            for _ in range(self._read("I")):
                alias, target = self._string(), self._string()
                self.aliases[alias] = target

    # -- variables -----------------------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        """The stored name for `name`, following aliases (and their `_scale`s)."""
        if name in self.variables:
            return name
        if name in self.aliases:
            return self.resolve(self.aliases[name])
        if name.endswith("_scale") and name[:-6] in self.aliases:
            return self.resolve(self.resolve(name[:-6]) + "_scale")
        return None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def tensor(self, name: str) -> torch.Tensor:
        stored = self.resolve(name)
        if stored is None:
            raise ModelFileError(f"{self.paths[0]} has no variable {name!r}")
        dtype, shape, offset, num_bytes = self.variables[stored]
        self.touched.append(stored)
        for index, start in enumerate(self._starts):
            end = self._starts[index + 1] if index + 1 < len(self._starts) else self._size
            if start <= offset and offset + num_bytes <= end and num_bytes:
                flat = torch.frombuffer(self._maps[index], dtype=dtype,
                                        count=num_bytes // dtype.itemsize, offset=offset - start)
                return flat.view(shape)
        data = bytearray(self._bytes(offset, num_bytes))  # spans two shards (or is empty)
        return torch.frombuffer(data, dtype=dtype).view(shape) if num_bytes else \
            torch.empty(shape, dtype=dtype)

    def float_tensor(self, name: str) -> torch.Tensor:
        """A variable as float32: int8 / int16 weights dequantized with their row scales."""
        tensor = self.tensor(name)
        if tensor.dtype in (torch.int8, torch.int16) and self.has(f"{name}_scale"):
            scale = self.tensor(f"{name}_scale").float()
            return tensor.float() / scale.reshape(-1, *([1] * (tensor.dim() - 1)))
        return tensor.float()

    def release_touched(self) -> None:
        """Give back the pages of the variables read so far (re-read from the file if needed
        again): converting a 24 GB file then never holds more than a tensor of it."""
        for name in self.touched:
            _, _, offset, num_bytes = self.variables[name]
            for index, start in enumerate(self._starts):
                data = self._maps[index]
                low = max(offset - start, 0)
                high = min(offset + num_bytes - start, len(data))
                first, last = -(-low // mmap.PAGESIZE) * mmap.PAGESIZE, high // mmap.PAGESIZE * mmap.PAGESIZE
                if isinstance(data, mmap.mmap) and last > first and hasattr(mmap, "MADV_DONTNEED"):
                    data.madvise(mmap.MADV_DONTNEED, first, last - first)
        self.touched.clear()

    def scalar(self, name: str, default: Any = None) -> Any:
        if not self.has(name):
            return default
        return self.tensor(name).reshape(-1)[0].item()

    def string(self, name: str) -> str | None:
        """Old files keep token strings as int8 variables."""
        if not self.has(name):
            return None
        return bytes(self.tensor(name).to(torch.uint8).tolist()).rstrip(b"\0").decode("utf-8")
