"""Opening a model: a kiln folder (or anything the converter reads, converted once into the
store), checked, its weights memory-mapped into the decoder, with its tokenizer and chat
template. Everything the engine needs, nothing about generation."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutOfMemory
from ..model.loading import check_folder, load_decoder, resolve_device
from ..model.loading import verify_checksums as verify_folder_checksums
from ..model.spec import KilnConfig, is_kiln_folder
from ..quant.compute_types import COMPUTE_TYPES, ComputeType
from ..quant.compute_types import resolve as resolve_compute_type
from ..quant.int4 import DEFAULT_GROUP_SIZE, check_group_size
from ..quant.kernels import BACKENDS
from .chat import ChatTemplate
from .tokenizer import Tokenizer, Vocabulary


@dataclass
class LoadedModel:
    path: Path
    config: KilnConfig
    model: torch.nn.Module
    device: torch.device
    compute: ComputeType
    tokenizer: Tokenizer | None
    vocabulary: object | None  # the tokenizer, or a bare vocabulary (CTranslate2 folders)
    chat_template: ChatTemplate | None

    @property
    def spec(self):
        return self.config.spec

    @property
    def dtype(self) -> torch.dtype:
        return self.compute.torch_dtype


def open_model(model_path: str | Path | None = None, device: str = "cpu",
               compute_type: str = "default", *, device_index: int = 0, intra_threads: int = 0,
               verify_checksums: bool = False, cache_dir: str | Path | None = None,
               int8_backend: str = "auto", group_size: int | None = None,
               tensor_parallel: bool = False) -> LoadedModel:
    """Load a kiln folder. Anything else `Generator.from_pretrained` takes (a Hugging Face,
    GGUF or CTranslate2 checkpoint, a hub id) is converted once into the store (`cache_dir`)
    in its own type. With no `model_path`: kiln's default model, SmolLM2-135M-Instruct.
    `group_size`: the int4 groups to quantize into at load (default: the folder's when it is
    int4, else 32). `tensor_parallel`: this process is one rank of a torchrun group and loads
    its part of every layer (kiln.model.tensor_parallel)."""
    # Options first: a bad one must fail before any conversion or loading.
    target = resolve_device(device, device_index)
    if compute_type not in COMPUTE_TYPES:
        resolve_compute_type(compute_type, ComputeType(None, "float32"), target)
    if group_size is not None:
        check_group_size(group_size)
        if not compute_type.startswith("int4"):
            raise ValueError(f"group_size applies to int4 compute types, not {compute_type!r}")
    if int8_backend == "auto" and os.environ.get("KILN_INT8_BACKEND"):
        int8_backend = os.environ["KILN_INT8_BACKEND"]
    if int8_backend not in ("auto", None, *BACKENDS):
        raise ValueError(f"unknown int8 backend {int8_backend!r}; known: auto, "
                         f"{', '.join(BACKENDS)}, None (dequantize per call)")
    if intra_threads < 0:
        raise ValueError(f"intra_threads must be >= 0 (0: all cores), got {intra_threads}")
    if model_path is None:
        from ..sources.default_model import default_model_path

        int4 = compute_type.startswith("int4")  # from the file's own 4-bit weights
        model_path = default_model_path(cache_dir, (group_size or DEFAULT_GROUP_SIZE) if int4
                                        else None)
    elif not is_kiln_folder(Path(model_path)):
        from ..sources.hub import resolve

        model_path = resolve(model_path, cache_dir=cache_dir).folder
    path = Path(model_path)
    config = check_folder(path)
    if verify_checksums:
        verify_folder_checksums(path, config)
    saved = ComputeType(config.weights, config.dtype, config.group_size)
    compute = resolve_compute_type(compute_type, saved, target)
    if compute.weights == "int4":
        compute = dataclasses.replace(compute, group_size=group_size or compute.group_size
                                      or DEFAULT_GROUP_SIZE)
    shard = None
    if tensor_parallel:
        from ..model.tensor_parallel import current_shard

        shard = current_shard()
        if target.type == "cuda":  # one GPU per rank
            target = resolve_device("cuda", int(os.environ.get("LOCAL_RANK", shard.rank)))
    if intra_threads:
        torch.set_num_threads(intra_threads)
    if target.type == "cuda" and compute.torch_dtype == torch.float16:
        # Pythia's activations overflow float16 sums: keep cuBLAS accumulating in float32.
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    try:
        model = load_decoder(path, config, compute, target, int8_backend, shard)
    except torch.OutOfMemoryError as error:
        needed = sum(info.get("bytes", 0) for info in config.files.values())
        raise OutOfMemory(
            f"out of memory loading {path} on {target}: its weights take "
            f"{needed / 2**30:.1f} GiB as stored ({config.weights or config.dtype}); "
            "free memory, use an int8 compute type, or load on another device") from error
    tokenizer = Tokenizer.from_folder(path)
    return LoadedModel(path, config, model, target, compute, tokenizer,
                       tokenizer or Vocabulary.from_folder(path), ChatTemplate.from_folder(path))
