"""A local Hugging Face checkpoint folder: config, weights (safetensors or .bin), tokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ...errors import ModelFileError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_CANDIDATES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)


def is_hf_folder(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / CONFIG).is_file() and any((folder / n).is_file() for n in WEIGHT_CANDIDATES)


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG}; a Hugging Face checkpoint folder "
                                f"needs {CONFIG} and its weights ({', '.join(WEIGHT_CANDIDATES)})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path} is not valid JSON: {error}") from error


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, preferring safetensors; sharded via their index."""
    folder = Path(folder)
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PYTORCH_BIN, PYTORCH_BIN_INDEX)):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ModelFileError(f"{folder / index} is not a valid weight index: {error}") from error
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{folder / index} lists shards that are missing: {missing}")
            return files
    raise FileNotFoundError(f"{folder} has no weights; looked for {', '.join(WEIGHT_CANDIDATES)}")


def _safetensors_source(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise ModelFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): "
                             f"{error}") from error
    return {name: partial(handle.get_tensor, name) for name in handle.keys()}


def _bin_source(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    # weights_only: never execute code from a checkpoint; mmap: do not read it all into memory.
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except Exception as error:
        raise ModelFileError(f"{path} could not be read as a PyTorch weights file: {error}") from error
    return {name: (lambda t=tensor: t) for name, tensor in state.items()}


def tensor_source(folder: Path) -> dict[str, Callable[[], torch.Tensor]]:
    """Every tensor of the checkpoint by name, loaded only when called."""
    tensors: dict[str, Callable[[], torch.Tensor]] = {}
    for path in weight_files(folder):
        reader = _safetensors_source if path.suffix == ".safetensors" else _bin_source
        tensors.update(reader(path))
    return tensors


def tokenizer_vocab_size(folder: Path) -> int | None:
    """How many ids the folder's tokenizer can produce (Pythia pads the embedding past it)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


class HFCheckpoint:
    """A local Hugging Face folder as conversion sees any checkpoint: config, tensors, tokenizer."""

    format_name = "huggingface"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        self.config = read_config(self.path)
        self.tensors = tensor_source(self.path)

    def tokenizer_vocab_size(self) -> int | None:
        return tokenizer_vocab_size(self.path)

    def dtype(self) -> str:
        return checkpoint_dtype(self.config, self.tensors)

    def unk_token_id(self) -> int | None:
        """The unknown token's id, from tokenizer_config.json and tokenizer.json."""
        config_path, tokenizer_path = self.path / "tokenizer_config.json", self.path / "tokenizer.json"
        if not (config_path.is_file() and tokenizer_path.is_file()):
            return None
        token = json.loads(config_path.read_text(encoding="utf-8")).get("unk_token")
        if isinstance(token, dict):
            token = token.get("content")
        if not isinstance(token, str):
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tokenizer_path)).token_to_id(token)

    def has_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write_tokenizer(self, output: Path, extra_files: list[str]) -> None:
        """Copy the tokenizer files (and any extra files asked for) into the output folder."""
        for name in [*TOKENIZER_FILES, *extra_files]:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, Path(output) / name)


def checkpoint_dtype(config: dict[str, Any], tensors: dict) -> str:
    """The float type the checkpoint was saved in."""
    name = config.get("dtype") or config.get("torch_dtype")
    if name in ("float32", "float16", "bfloat16"):
        return name
    for load in tensors.values():
        tensor = load()
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "float32"
