"""A memory-mapped safetensors file whose pages can be given back.

Tensors are zero-copy views of a private (copy-on-write) mapping of the file, so loading is
near instant and pages are shared with the page cache. When a tensor has been repacked for a
kernel (a private copy), `release` tells the kernel its pages are no longer needed, so they stop
counting in the process's memory: without it, peak RSS would hold every weight twice.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from ..errors import ModelFileError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


class MappedSafetensors:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise self._corrupt("shorter than a safetensors header")
            (header_bytes,) = struct.unpack("<Q", prefix)
            if header_bytes > min(size - 8, MAX_HEADER_BYTES):
                raise self._corrupt(f"its header claims {header_bytes} bytes")
            try:
                header = json.loads(handle.read(header_bytes))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise self._corrupt(f"its header is not JSON ({error})") from error
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._data_start = 8 + header_bytes
        header.pop("__metadata__", None)
        self._entries = {name: self._entry(name, info, size) for name, info in header.items()}

    def _corrupt(self, why: str) -> ModelFileError:
        return ModelFileError(f"{self.path} is not a valid safetensors file (corrupt or truncated?): {why}")

    def _entry(self, name: str, info: dict, size: int) -> tuple[torch.dtype, list[int], int, int]:
        try:
            dtype, shape = DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
            start, end = (self._data_start + int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as error:
            raise self._corrupt(f"bad entry for {name!r}: {info!r}") from error
        numel = 1
        for dim in shape:
            numel *= dim
        if end - start != numel * dtype.itemsize or end > size or start < self._data_start:
            raise self._corrupt(f"tensor {name!r} lies outside the file or has the wrong size")
        return dtype, shape, start, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize,
                                offset=start)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's resident pages (they re-read from the file if touched again)."""
        _, _, start, end = self._entries[name]
        page = mmap.PAGESIZE
        first, last = -(-start // page) * page, end // page * page  # whole pages inside only
        if self._map is not None and last > first and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
