"""Load a kiln folder into a Decoder: check files, mmap the weights, build on meta, assign.

Building on the meta device and loading with `assign=True` means the weights are the
mmapped tensors themselves (when no dtype or device change is asked): no second copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import ModelFileError
from ..quant.compute_types import ComputeType
from ..quant.int4 import Int4Linear
from ..quant.int8 import QuantizedLinear
from ..quant.kernels import default_backend
from ..quant.stored import encode, is_form, take_stored, weight_type
from ..storage.layout import CONFIG_FILE
from ..storage.safetensors_mmap import MappedSafetensors
from .decoder import Decoder, MetaLinear, build_decoder, expected_weights, input_sizes
from .spec import KilnConfig, ModelSpec, is_kiln_folder
from .tensor_parallel import Shard, local_spec, shard_state, wrap_row_parallel

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str, device_index: int = 0) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; valid devices: {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked but this PyTorch sees no CUDA device; "
                             "use device='cpu' (or 'auto')")
        if not 0 <= device_index < torch.cuda.device_count():
            raise ValueError(f"device_index {device_index} is out of range; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", device_index)
    return torch.device("cpu")


def check_folder(folder: Path) -> KilnConfig:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no model at {folder}: give a kiln folder (made by "
                                "`kiln convert`)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is a file, not a model folder")
    if not is_kiln_folder(folder):
        if (folder / CONFIG_FILE).is_file():
            raise ValueError(f"{folder} is not a kiln folder (its {CONFIG_FILE} has no "
                             "'format': 'kiln'); convert it first (kiln convert "
                             f"{folder} OUTPUT_DIR) or load it with Generator.from_pretrained")
        raise FileNotFoundError(f"{folder} is not a model folder: looked for {CONFIG_FILE} "
                                "and model.safetensors, found neither")
    config = KilnConfig.load(folder)
    files = config.files
    if not files:
        raise ModelFileError(f"{folder / CONFIG_FILE} lists no weight files")
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is missing its weight file {name}")
        size = path.stat().st_size
        if size != info.get("bytes", size):
            raise ModelFileError(f"{path} has {size} bytes but {info['bytes']} were written: the file "
                                 "is truncated or corrupt; convert the model again")
    return config


def verify_checksums(folder: Path, config: KilnConfig) -> None:
    for name, info in config.files.items():
        digest = hashlib.sha256()
        with open(Path(folder) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        if "sha256" in info and digest.hexdigest() != info["sha256"]:
            raise ModelFileError(f"{Path(folder) / name} does not match its sha256 in config.json: "
                                 "the file is corrupt; convert the model again")


def read_weights(folder: Path, config: KilnConfig) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, MappedSafetensors]]:
    """Every tensor of the folder, memory-mapped, with the file each comes from; names and
    shapes checked against the spec."""
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, MappedSafetensors] = {}
    for name in config.files:
        mapped = MappedSafetensors(Path(folder) / name)
        for key in mapped.keys():
            tensors[key], files[key] = mapped.tensor(key), mapped
    expected = expected_weights(config.spec, config.weights, config.group_size)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFileError(f"{folder} does not match its config.json: missing tensors {missing[:5]}, "
                             f"unexpected tensors {unexpected[:5]}")
    for key, want in expected.items():
        if tuple(tensors[key].shape) != tuple(want.shape):
            raise ModelFileError(f"{folder}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                                 f"config.json implies {tuple(want.shape)}")
        integer_part = not want.is_floating_point() or key.endswith(("_scale", "_scales", "_mins"))
        if integer_part and tensors[key].dtype != want.dtype:
            raise ModelFileError(f"{folder}: tensor {key} is {tensors[key].dtype}, config.json "
                                 f"({config.weights} weights) implies {want.dtype}; the file is "
                                 "corrupt or from another conversion: convert the model again")
    return tensors, files


def load_decoder(folder: Path, config: KilnConfig, compute: ComputeType,
                 device: torch.device, int8_backend: str | None = "auto",
                 shard: Shard | None = None) -> Decoder:
    """Build the decoder for `compute` and fill it with the folder's weights, converting
    between float and integer weights where the folder and the compute type differ. With
    `shard`, only this rank's part of every layer (kiln.model.tensor_parallel)."""
    tensors, files = read_weights(folder, config)
    copied: list[str] = []  # stored tensors that were converted: their mapped pages are spare
    spec = config.spec if shard is None else local_spec(config.spec, shard.world)
    decoder = build_decoder(spec, compute.weights, compute.torch_dtype, compute.group_size)
    state = dict(_converted(tensors, config, compute, device, copied))
    if shard is not None:
        state = shard_state(state, config.spec, shard, compute.group_size)
    decoder.load_state_dict(state, strict=True, assign=True)
    del state, tensors
    if shard is not None:
        wrap_row_parallel(decoder)
        decoder.shard = shard
    if config.spec.tie_word_embeddings:
        decoder.tie_head(_tied_head(decoder, config.spec, compute))
    for name in copied:
        for part in (name, f"{name}_scale", f"{name}_scales", f"{name}_mins"):
            if part in files:
                files[part].release(part)

    def release(name: str) -> None:
        if name not in copied and name in files:
            files[name].release(name)

    if compute.weights == "int4":
        pack_int4_kernels(decoder, release, drop_stored=set(copied))
    if compute.weights in ("int8", "int4"):
        backend = default_backend(device) if int8_backend == "auto" else int8_backend
        pack_kernels(decoder, backend, release=release)
        decoder.int8_backend = backend
    decoder.prepare(device)
    decoder.eval().requires_grad_(False)
    return decoder


def pack_kernels(decoder: Decoder, backend: str | None, release: Callable[[str], None]) -> None:
    """Pack every int8 projection for its kernel, on all cores. As soon as one is packed, the
    pages of its stored copy are released, so memory never holds every weight twice."""
    tied = decoder.spec.tie_word_embeddings

    def pack(name: str, module: QuantizedLinear) -> None:
        module.prepare(backend)
        if module.weight is None and not (tied and name == "lm_head"):  # the embedding reads it
            release(f"{name}.weight")

    modules = [(name, module) for name, module in decoder.named_modules()
               if isinstance(module, QuantizedLinear)]
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(lambda item: pack(*item), modules))


def pack_int4_kernels(decoder: Decoder, release: Callable[[str], None],
                      drop_stored: set[str]) -> None:
    """Pack every 4-bit projection for the device's kernel, on all cores. The stored form of
    a packed one is released: mapped pages are dropped (they re-read from the file if the
    exact path is ever asked for), and weights quantized at load are freed."""

    def pack(name: str, module: Int4Linear) -> None:
        if module.prepare():
            if f"{name}.weight" in drop_stored:
                module.drop_stored()
            for part in ("weight", "weight_scales", "weight_mins"):
                release(f"{name}.{part}")

    modules = [(name, module) for name, module in decoder.named_modules()
               if isinstance(module, Int4Linear)]
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        list(pool.map(lambda item: pack(*item), modules))


def _converted(tensors: dict[str, torch.Tensor], config: KilnConfig, compute: ComputeType,
               device: torch.device, copied: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors as the compute type wants them; untouched (mmapped) when they match.
    Names of weights that had to be converted are appended to `copied`."""
    dtype = compute.torch_dtype
    for name, columns in input_sizes(config.spec).items():
        stored = take_stored(tensors, name, columns, config.group_size)
        target = weight_type(name, compute.weights)
        if target is None and isinstance(stored, torch.Tensor):
            weight = stored.to(device=device, dtype=dtype)
            yield name, weight
            if weight.data_ptr() != stored.data_ptr():
                copied.append(name)
            continue
        if not is_form(stored, target, compute.group_size):
            copied.append(name)
        for key, tensor in encode(name, stored, target, compute.group_size, dtype):
            yield key, tensor.to(device)
    for name, tensor in tensors.items():  # norms, biases, learned positions
        yield name, tensor.to(device=device, dtype=dtype)


def _tied_head(decoder: Decoder, spec: ModelSpec, compute: ComputeType) -> torch.nn.Module:
    """The output projection of a tied model: the embedding's own tensors, not a copy."""
    if compute.weights is None:
        head = MetaLinear(spec.hidden_size, spec.vocab_size, bias=False)
        head.weight = decoder.embed.weight
        return head
    head = QuantizedLinear(spec.hidden_size, spec.vocab_size, False,
                           weight_type("embed.weight", compute.weights), compute.torch_dtype)
    head.weight, head.weight_scale = decoder.embed.weight, decoder.embed.weight_scale
    return head
