"""kiln folders of encoders and translators: `kiln convert` writes them, `kiln.Encoder` and
`kiln.Translator` read them.

    config.json        {"format": "kiln", "kind": "encoder" | "translator", "model": spec,
                        "quantization": {"dtype", "weights"}, "source": {...}}
    model.safetensors  kiln's names; int8/int16 weights with a float32 scale per row
    tokens             source_vocabulary.json / target_vocabulary.json (translators),
                       vocabulary.json (encoders), and the model's tokenizer and
                       sentence-transformers files as they were

A folder is written to a hidden temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .model.encoder import QUANTIZED
from .quant.compute_types import ComputeType
from .quant.int8 import IntegerWeight, QuantizedLinear, quantize_rows

KINDS = ("encoder", "translator")
FORMAT = "kiln"
COPIED = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
          "merges.txt", "source.spm", "target.spm", "sentencepiece.bpe.model", "spiece.model",
          "generation_config.json", "modules.json", "sentence_bert_config.json",
          "config_sentence_transformers.json", "1_Pooling/config.json"]


def kiln_kind(folder: Path) -> str | None:
    """"encoder" or "translator" for a kiln folder of one, else None."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("format") == FORMAT and data.get("kind") in KINDS:
        return data["kind"]
    return None


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def stored_pairs(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(kiln name, tensor) of a kiln folder's weights; integer weights as IntegerWeight, kept
    as they are by a model of the same integer type (dequantized for any other)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        scales = {name for name in names if name.endswith(".weight_scale")}
        for name in names:
            if name in scales:
                continue
            tensor = handle.get_tensor(name)
            if f"{name}_scale" in scales:
                bits = "int8" if tensor.dtype == torch.int8 else "int16"
                tensor = IntegerWeight(tensor, handle.get_tensor(f"{name}_scale"), bits)
            yield name, tensor


def write(output: Path, kind: str, model_class, spec, pairs, compute: ComputeType,
          source: Path, tokens: dict[str, list[str]], force: bool = False,
          origin: dict[str, Any] | None = None) -> Path:
    """Write a kiln folder of `kind` from (kiln name, tensor) pairs, quantized as `compute`
    says; `tokens` maps file stems to token lists (e.g. {"target_vocabulary": [...]})."""
    from safetensors.torch import save_file

    output, source = Path(output), Path(source)
    if output.exists() and not force:
        raise FileExistsError(f"output folder {output} already exists; pass force=True "
                              "(--force) to replace it")
    skeleton = model_class(spec, compute.weights, compute.torch_dtype)
    # (cloned: tied tables share storage, which safetensors refuses)
    tensors = {name: tensor.contiguous().clone()
               for name, tensor in stored_forms(skeleton, pairs, compute)}
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        save_file(tensors, str(partial / "model.safetensors"))
        for name in COPIED:
            if (source / name).is_file():
                (partial / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source / name, partial / name)
        for stem, token_list in tokens.items():
            (partial / f"{stem}.json").write_text(json.dumps(token_list), encoding="utf-8")
        config = {"format": FORMAT, "format_version": 1, "kind": kind, "model": spec.to_dict(),
                  "quantization": {"dtype": compute.dtype, "weights": compute.weights},
                  "source": {"path": str(source.resolve()), **({"origin": origin} if origin
                                                               else {})}}
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n",
                                             encoding="utf-8")  # last: a folder without it never loads
        if output.exists():
            shutil.rmtree(output)
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output


def stored_forms(model: torch.nn.Module, pairs,
                 compute: ComputeType) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a model built for `compute` holds, from (kiln name, tensor) pairs: integer
    rows and their scales for its integer modules (kept as they are when already of that
    type), `compute`'s float type for the rest."""
    quantized = {name for name, module in model.named_modules() if isinstance(module, QUANTIZED)}
    for name, tensor in pairs:
        module, _, part = name.rpartition(".")
        if module in quantized and part == "weight":
            values, scale = integer_rows(tensor, compute.weights)
            yield name, values
            yield f"{module}.weight_scale", scale
            continue
        if isinstance(tensor, IntegerWeight):
            tensor = tensor.dequantize()
        yield name, tensor.to(compute.torch_dtype)


def assemble(model: torch.nn.Module, pairs, compute: ComputeType,
              device: torch.device) -> torch.nn.Module:
    """Fill a model built on the meta device from (kiln name, tensor) pairs: integer modules
    get integer rows (kept as they are when already of that type), the rest `compute`'s
    float type; a pair naming a plain attribute (a position table) replaces it. Then pack the
    int8 kernels and check nothing is left on the meta device."""
    from .quant.kernels import default_backend

    keys = set(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name, tensor in stored_forms(model, pairs, compute):
        if name in keys:
            state[name] = tensor.to(device)
        else:  # a non-persistent buffer the checkpoint stores (Marian's position tables)
            setattr(model, name, tensor.to(device))
    model.load_state_dict(state, assign=True, strict=False)
    missing = [name for name, value in model.state_dict().items() if value.device.type == "meta"]
    if missing:
        raise ValueError(f"the checkpoint does not fill {missing[:5]}")
    for name, buffer in model.named_buffers():
        if buffer.device != device and "." not in name:
            setattr(model, name, buffer.to(device))
    backend = default_backend(device) if compute.weights == "int8" else None
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.prepare(backend)
    return model.eval()


def integer_rows(tensor, bits: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer rows, float32 scale per row): an already-quantized weight of the same type
    as it is (quantizing its float values again could move a scale by one ulp), else
    quantized."""
    if isinstance(tensor, IntegerWeight):
        if tensor.bits == bits:
            return tensor.values, tensor.scale.float()
        tensor = tensor.dequantize()
    return quantize_rows(tensor, bits)


def open_stored(folder: Path, spec_class, *token_stems: str) -> tuple:
    """(spec, saved compute type, (kiln name, tensor) pairs, *token lists) of a kiln folder."""
    config = read_config(folder)
    return (spec_class(**config["model"]), saved_compute(config), stored_pairs(folder),
            *(read_tokens(folder, stem) for stem in token_stems))


def checkpoint_compute(config: dict[str, Any]) -> ComputeType:
    """A Hugging Face checkpoint's own float type (float16 as saved, else float32)."""
    saved = "float16" if config.get("torch_dtype", config.get("dtype")) == "float16" \
        else "float32"
    return ComputeType(None, saved)


def saved_compute(config: dict[str, Any]) -> ComputeType:
    quantization = config.get("quantization", {})
    return ComputeType(quantization.get("weights"), quantization.get("dtype", "float32"))


def read_tokens(folder: Path, stem: str) -> list[str] | None:
    path = Path(folder) / f"{stem}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
