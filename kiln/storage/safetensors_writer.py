"""Write safetensors shards whose layout is known before the data: each tensor goes to its
offset as it arrives, so a conversion holds one tensor at a time, never a whole shard."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from ..errors import ModelFileError
from .layout import WEIGHTS_FILE

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
               torch.uint8: "U8"}


class ShardedWriter:
    def __init__(self, folder: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int) -> None:
        self.layout = layout
        sizes = {name: dtype.itemsize * _numel(shape) for name, (dtype, shape) in layout.items()}
        shards: list[list[str]] = [[]]
        total = 0
        for name in sorted(layout):
            if shards[-1] and total + sizes[name] > max_shard_bytes:
                shards.append([])
                total = 0
            shards[-1].append(name)
            total += sizes[name]
        count = len(shards)
        self.paths = [Path(folder) / (WEIGHTS_FILE if count == 1 else
                                      f"model-{i + 1:05d}-of-{count:05d}.safetensors")
                      for i in range(count)]
        self.place: dict[str, tuple[int, int, int]] = {}  # name -> (shard, offset, size)
        self.handles = []
        for index, (names, path) in enumerate(zip(shards, self.paths, strict=True)):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                dtype, shape = layout[name]
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + sizes[name]]}
                offset += sizes[name]
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
            start = 8 + len(text)
            handle = open(path, "wb+")  # noqa: SIM115 - closed in close()
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(start + offset)
            self.handles.append(handle)
            for name in names:
                begin = header[name]["data_offsets"][0]
                self.place[name] = (index, start + begin, sizes[name])
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the layout "
                             f"expects {dtype} {tuple(shape)}")
        shard, offset, size = self.place[name]
        data = tensor.detach().contiguous().cpu()
        if data.dtype == torch.bfloat16:  # numpy has no bfloat16: write the same bits as int16
            data = data.view(torch.int16)
        handle = self.handles[shard]
        handle.seek(offset)
        if size:
            handle.write(memoryview(data.numpy()).cast("B"))
        self.written.add(name)

    def close(self) -> dict[str, dict]:
        for handle in self.handles:
            handle.close()
        missing = sorted(set(self.layout) - self.written)
        if missing:
            raise ModelFileError(f"the checkpoint lacks tensors the config requires: {missing}")
        return {path.name: {"bytes": path.stat().st_size, "sha256": sha256(path)}
                for path in self.paths}

    def abort(self) -> None:
        for handle in self.handles:
            handle.close()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
