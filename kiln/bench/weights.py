"""Bytes of weights one decoding step reads, counted from a model folder's files.

The input embedding is a row lookup, so it is left out, unless the output head is tied to it
(then the head reads the whole matrix). Used for the memory-bandwidth ceiling.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

EMBEDDING_MARKERS = ("embed_in.", "embed_tokens.", "wte.", "wpe.")
HEAD_MARKERS = ("lm_head.", "embed_out.")
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                        "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _is_embedding(name: str) -> bool:
    return name.startswith("embed.") or any(marker in name for marker in EMBEDDING_MARKERS)


def safetensors_tensors(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (dtype, bytes) for every tensor of every *.safetensors file in `folder`."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                tensors[name] = (entry["dtype"], end - start)
    return tensors


def safetensors_bytes_per_step(folder: Path, itemsize: int | None = None) -> int:
    """Weight bytes read per step; `itemsize` re-prices every tensor at that many bytes per
    element (transformers loads a float32 folder as bfloat16, for example)."""
    tensors = safetensors_tensors(folder)
    if not tensors:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    tied = not any(marker in name for name in tensors for marker in HEAD_MARKERS)

    def priced(dtype: str, size: int) -> int:
        return size if itemsize is None else size // SAFETENSORS_ITEMSIZE[dtype] * itemsize

    return sum(priced(dtype, size) for name, (dtype, size) in tensors.items()
               if tied or not _is_embedding(name))


def _read_string(handle) -> str:
    (length,) = struct.unpack("<H", handle.read(2))
    return handle.read(length).rstrip(b"\0").decode("utf-8")


def ctranslate2_variables(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(name -> bytes, alias -> target) from a CTranslate2 model.bin (binary version 6)."""
    variables: dict[str, int] = {}
    aliases: dict[str, str] = {}
    with open(Path(folder) / "model.bin", "rb") as handle:
        (version,) = struct.unpack("<I", handle.read(4))
        if version < 5:
            raise ValueError(f"CTranslate2 model.bin binary version {version} is not readable here")
        _read_string(handle)  # spec name
        handle.read(4)  # spec revision
        (count,) = struct.unpack("<I", handle.read(4))
        for _ in range(count):
            name = _read_string(handle)
            (rank,) = struct.unpack("<B", handle.read(1))
            handle.read(4 * rank + 1)  # dims, dtype
            (size,) = struct.unpack("<I", handle.read(4))
            handle.seek(size, 1)
            variables[name] = size
        (count,) = struct.unpack("<I", handle.read(4))
        for _ in range(count):
            alias = _read_string(handle)
            aliases[alias] = _read_string(handle)
    return variables, aliases


def ctranslate2_bytes_per_step(folder: Path) -> int:
    variables, aliases = ctranslate2_variables(folder)
    read = sum(size for name, size in variables.items() if "embeddings" not in name)
    read += sum(variables.get(target, 0) for alias, target in aliases.items()
                if "embeddings" not in alias and "embeddings" in target)  # a tied head
    return read


def folder_bytes(folder: Path) -> int:
    """Size on disk: every file under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
