"""Load a kiln folder into a Decoder: check files, mmap the weights, build on meta, assign.

Building on the meta device and loading with `assign=True` means the weights are the
mmapped tensors themselves (when no dtype or device change is asked): no second copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from .decoder import Decoder, expected_weight_shapes
from .spec import CONFIG_FILE, FLOAT_DTYPES, KilnConfig, is_kiln_folder

DEVICES = ("cpu", "cuda", "auto")
COMPUTE_TYPES = ("default", "auto", *FLOAT_DTYPES)


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


def supported_compute_types(device: torch.device) -> list[str]:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return ["float32", "float16"]
    return list(FLOAT_DTYPES)


def resolve_compute_type(compute_type: str, saved_dtype: str, device: torch.device) -> str:
    """The float type to run in. 'default' keeps the saved type (falling back where the
    device cannot run it); 'auto' picks the fastest faithful type for the device."""
    supported = supported_compute_types(device)
    if compute_type not in COMPUTE_TYPES:
        raise ValueError(f"unknown compute_type {compute_type!r}; valid on {device.type}: "
                         f"{', '.join(['default', 'auto', *supported])}")
    if compute_type == "auto":
        if device.type == "cuda":
            return "bfloat16" if "bfloat16" in supported else "float16"
        return "float32"
    if compute_type == "default":
        if saved_dtype in supported:
            return saved_dtype
        return "float16" if device.type == "cuda" else "float32"
    if compute_type not in supported:
        raise ValueError(f"compute_type {compute_type!r} cannot run on {device}; valid there: "
                         f"{', '.join(['default', 'auto', *supported])}")
    return compute_type


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
                             "'format': 'kiln'); convert it first: kiln convert "
                             f"{folder} OUTPUT_DIR")
        raise FileNotFoundError(f"{folder} is not a model folder: looked for {CONFIG_FILE} "
                                "and model.safetensors, found neither")
    config = KilnConfig.load(folder)
    files = config.weights.get("files", {})
    if not files:
        raise ValueError(f"{folder / CONFIG_FILE} lists no weight files")
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is missing its weight file {name}")
        size = path.stat().st_size
        if size != info.get("bytes", size):
            raise ValueError(f"{path} has {size} bytes but {info['bytes']} were written: the file "
                             "is truncated or corrupt; convert the model again")
    return config


def verify_checksums(folder: Path, config: KilnConfig) -> None:
    for name, info in config.weights.get("files", {}).items():
        digest = hashlib.sha256()
        with open(Path(folder) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        if "sha256" in info and digest.hexdigest() != info["sha256"]:
            raise ValueError(f"{Path(folder) / name} does not match its sha256 in config.json: "
                             "the file is corrupt; convert the model again")


def read_weights(folder: Path, config: KilnConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, memory-mapped; shapes checked against the spec."""
    tensors: dict[str, torch.Tensor] = {}
    for name in config.weights["files"]:
        path = Path(folder) / name
        try:
            handle = safe_open(str(path), framework="pt")
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
        except Exception as error:  # safetensors raises its own types for a bad header
            raise ValueError(f"{path} could not be read (corrupt or truncated?): {error}") from error
    expected = expected_weight_shapes(config.spec)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{folder} does not match its config.json: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{folder}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                             f"config.json implies {shape}")
    return tensors


def load_decoder(folder: Path, config: KilnConfig, dtype: torch.dtype,
                 device: torch.device) -> Decoder:
    tensors = read_weights(folder, config)
    with torch.device("meta"):
        decoder = Decoder(config.spec)
    # Cast or move only when asked: otherwise the mmapped tensors are used as they are.
    state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in tensors.items()}
    decoder.load_state_dict(state, strict=True, assign=True)
    decoder.prepare(device)
    decoder.eval().requires_grad_(False)
    return decoder
