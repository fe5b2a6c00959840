"""Convert a checkpoint into a kiln folder: validate, convert, write to a temporary folder, rename.

An interrupted conversion leaves only a hidden `.NAME.partial-*` folder, never a folder that
loads; an existing output is replaced only with `force`, and only once the new one is complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError
from ..model.decoder import expected_weight_shapes, quantizable_weight_names
from ..model.spec import KilnConfig, ModelSpec
from ..quant.compute_types import NAMED, ComputeType
from ..quant.int4 import DEFAULT_GROUP_SIZE, check_group_size
from ..quant.stored import encode, part_dtypes, weight_type
from ..storage.safetensors_writer import ShardedWriter
from .archs import get_adapter
from .formats import hf

QUANTIZATIONS = NAMED
DEFAULT_SHARD_BYTES = 4 * 1024**3


def convert(source: str | Path, output_dir: str | Path, quantization: str | None = None,
            force: bool = False, copy_files: Iterable[str] | None = None, *,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
            origin: dict[str, Any] | None = None, group_size: int | None = None) -> Path:
    """Convert a local Hugging Face checkpoint folder, GGUF file or CTranslate2 folder into a
    kiln folder (hub ids are downloaded first by `kiln.sources.hub.convert_source`).

    `quantization` is a compute type name (float32, float16, bfloat16, int8, int8_float32,
    int8_float16, int8_bfloat16, int16, int4, int4_float32, int4_float16, int4_bfloat16);
    None keeps the checkpoint's float type. int4 quantizes in groups of `group_size` input
    columns (32, 64, 128 or 256; default 32); 4-bit GGUF blocks in the same groups are
    kept as they are. `progress` shows a bar over the tensors; `origin` (hub id, revision, commit) is recorded
    in config.json.
    """
    source, output_dir = Path(source), Path(output_dir)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)}")
    if output_dir.exists() and not force:
        raise FileExistsError(f"output folder {output_dir} already exists; pass force=True "
                              "(--force) to replace it")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder")
    other = _encoder_or_translator(source)
    if other is not None:  # their own folders: kiln.Encoder / kiln.Translator read them
        if group_size is not None:
            raise ValueError("group_size applies to int4 decoders")
        return other(source, output_dir, quantization, force, origin)
    checkpoint = open_checkpoint(source)
    spec, tensors, tokens = _kiln_model(checkpoint)
    if tokens.unk is None and hasattr(checkpoint, "unk_token_id"):
        tokens.unk = checkpoint.unk_token_id()
    saved = ComputeType(getattr(checkpoint, "weights", lambda: None)(), checkpoint.dtype())
    target = ComputeType.parse(quantization or saved.name, saved_dtype=saved.dtype)
    if target.weights == "int4":
        target = ComputeType("int4", target.dtype,
                             check_group_size(group_size or DEFAULT_GROUP_SIZE))
    elif group_size is not None:
        raise ValueError(f"group_size applies to int4 quantization, not {target.name}")
    if target.weights == "int4" and hasattr(checkpoint, "keep_4bit_groups"):
        checkpoint.keep_4bit_groups(target.group_size)
    extra_files = list(copy_files or [])
    missing = [name for name in extra_files if not checkpoint.has_file(name)]
    if missing:
        raise FileNotFoundError(f"copy_files names files that {source} does not have: {missing}")

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.parent / f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        if progress:
            from tqdm.auto import tqdm

            tensors = tqdm(tensors, total=len(expected_weight_shapes(spec)), unit="tensor",
                           desc=f"converting {source.name}")
        weights = _write_weights(tensors, spec, target, partial, max_shard_bytes)
        checkpoint.write_tokenizer(partial, extra_files)
        kiln_config = KilnConfig(
            spec=spec, dtype=target.dtype, weights=target.weights, tokens=tokens,
            files=weights, group_size=target.group_size,
            source={"format": checkpoint.format_name, "path": str(source.resolve()),
                    "model_type": checkpoint.config.get("model_type"),
                    **({"origin": origin} if origin else {})},
        )
        kiln_config.save(partial)  # written last: a folder without it never loads
        _make_readable(partial)
        _move_into_place(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output_dir


def model_kind(source: Path) -> str:
    """"encoder", "translator" or "generator": which kiln class loads `source` (a kiln,
    Hugging Face or CTranslate2 folder, or a GGUF file)."""
    from ..seq_folder import kiln_kind
    from .archs.bart import is_seq2seq_type
    from .archs.bert import is_encoder_type
    from .formats.ctranslate2_encoder import is_ctranslate2_encoder
    from .formats.ctranslate2_seq2seq import is_ctranslate2_translator

    source = Path(source)
    if not source.is_dir():
        return "generator"
    kind = kiln_kind(source)
    if kind is not None:
        return kind
    model_type = hf.read_config(source).get("model_type") if hf.is_hf_folder(source) else None
    if is_seq2seq_type(model_type) or is_ctranslate2_translator(source):
        return "translator"
    if is_encoder_type(model_type) or is_ctranslate2_encoder(source):
        return "encoder"
    return "generator"


def _encoder_or_translator(source: Path):
    """The converter of an encoder or translator source (Hugging Face or CTranslate2), else
    None (a decoder)."""
    kind = model_kind(source)
    if kind == "translator":
        from ..translator_files import convert_translator

        return convert_translator
    if kind == "encoder":
        from ..encoder import convert_encoder

        return convert_encoder
    return None


def open_checkpoint(source: Path):
    """A reader for the source: a Hugging Face folder, a GGUF file or a CTranslate2 folder."""
    from .formats.ctranslate2 import is_ctranslate2_folder

    if source.is_file() and source.suffix == ".gguf":
        from .formats.gguf import GGUFCheckpoint

        return GGUFCheckpoint(source)
    if not source.is_dir():
        raise FileNotFoundError(f"no model folder at {source}: give a Hugging Face checkpoint "
                                "folder (config.json + weights), a .gguf file or a CTranslate2 "
                                "folder")
    if is_ctranslate2_folder(source):
        from .formats.ctranslate2 import CTranslate2Checkpoint

        return CTranslate2Checkpoint(source)
    return hf.HFCheckpoint(source)


def _kiln_model(checkpoint) -> tuple[ModelSpec, Iterator[tuple[str, Any]], Any]:
    """(spec, kiln-named tensors, special token ids): through the family's adapter, or
    directly for formats that map to kiln's spec themselves (CTranslate2)."""
    if hasattr(checkpoint, "kiln_model"):
        return checkpoint.kiln_model()
    adapter = get_adapter(checkpoint.config.get("model_type"))
    spec = adapter.spec_from_config(checkpoint.config, _usable_tokenizer_size(checkpoint))
    return spec, adapter.convert_weights(spec, checkpoint.tensors), adapter.token_ids(checkpoint.config)


def _usable_tokenizer_size(checkpoint) -> int | None:
    size = checkpoint.tokenizer_vocab_size()
    if size is None or size > checkpoint.config.get("vocab_size", 0):
        return None  # a tokenizer larger than the embedding cannot tell which rows are padding
    return size


def _stored_tensors(named_tensors: Iterator[tuple[str, Any]], spec: ModelSpec,
                    target: ComputeType) -> Iterator[tuple[str, torch.Tensor]]:
    """Checked, cast or quantized tensors (with their scales), in the order they come."""
    expected = expected_weight_shapes(spec)
    quantizable = quantizable_weight_names(spec)
    for name, tensor in _unshared(named_tensors):
        if name not in expected:
            raise ModelFileError(f"converter produced an unexpected tensor {name!r}")
        want = expected.pop(name)
        if tuple(tensor.shape) != want:
            raise ModelFileError(f"tensor {name!r} has shape {tuple(tensor.shape)}; the config implies "
                                 f"{want}: config.json and weights disagree")
        bits = weight_type(name, target.weights) if name in quantizable else None
        if name not in quantizable and not isinstance(tensor, torch.Tensor):
            tensor = tensor.dequantize()  # a norm or bias that came quantized
        yield from encode(name, tensor, bits, target.group_size, target.torch_dtype)
    if expected:
        raise ModelFileError(f"the checkpoint lacks tensors the config requires: {sorted(expected)}")


def _unshared(named_tensors: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Copies of tensors that share memory with an earlier one (CTranslate2 aliases identical
    variables); safetensors stores every tensor on its own."""
    seen: set[int] = set()
    for name, tensor in named_tensors:
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            if tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
        yield name, tensor


def _write_weights(named_tensors: Iterator[tuple[str, torch.Tensor]], spec: ModelSpec,
                   target: ComputeType, folder: Path, max_shard_bytes: int) -> dict[str, Any]:
    """Stream tensors into safetensors shards of at most max_shard_bytes each, laid out from
    the spec in advance, so only the tensor being written is in memory."""
    shapes = expected_weight_shapes(spec, target.weights, target.group_size)
    dtypes: dict[str, torch.dtype] = {}
    for name in quantizable_weight_names(spec):
        dtypes.update(part_dtypes(name, weight_type(name, target.weights), target.torch_dtype))
    writer = ShardedWriter(folder, {name: (dtypes.get(name, target.torch_dtype), shape)
                                    for name, shape in shapes.items()}, max_shard_bytes)
    try:
        for name, tensor in _stored_tensors(named_tensors, spec, target):
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _make_readable(folder: Path) -> None:
    """Weights are written 0600 by safetensors; a model folder is readable like any file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(partial: Path, output_dir: Path) -> None:
    if not output_dir.exists():
        partial.rename(output_dir)
        return
    retired = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
    output_dir.rename(retired)
    partial.rename(output_dir)
    shutil.rmtree(retired, ignore_errors=True)
