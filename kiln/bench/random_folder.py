"""A kiln folder with random weights, written tensor by tensor: the way to get a Pythia-12B
shape onto a machine without first building a 48 GB float32 Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model.decoder import expected_weight_shapes, quantizable_weight_names
from ..model.spec import KilnConfig, ModelSpec, TokenIds
from ..quant.compute_types import ComputeType
from ..quant.int4 import DEFAULT_GROUP_SIZE, group_count
from ..quant.int8 import INT_DTYPES, QMAX
from ..quant.stored import weight_type

SHARD_BYTES = 2 * 1024**3


def pythia_spec(hidden_size: int, num_layers: int, num_heads: int, vocab_size: int = 50304,
                tokenizer_size: int = 50277, max_positions: int = 2048) -> ModelSpec:
    head_dim = hidden_size // num_heads
    return ModelSpec(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                     num_heads=num_heads, num_kv_heads=num_heads, head_dim=head_dim,
                     intermediate_size=4 * hidden_size, max_position_embeddings=max_positions,
                     parallel_residual=True, rotary_dim=head_dim // 4, qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True, tokenizer_vocab_size=tokenizer_size)


def write_random_folder(spec: ModelSpec, folder: Path, compute: ComputeType,
                        seed: int = 0) -> Path:
    """Random weights (std 0.02, norms 1) stored as `compute` stores them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    quantized = quantizable_weight_names(spec) if compute.weights else set()
    shard: dict[str, torch.Tensor] = {}
    files: dict[str, dict] = {}

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        files[name] = {"bytes": (folder / name).stat().st_size}
        shard.clear()

    size = 0
    group_size = (compute.group_size or DEFAULT_GROUP_SIZE) if compute.weights == "int4" else None
    for name, shape in expected_weight_shapes(spec).items():
        bits = weight_type(name, compute.weights)
        if name in quantized and bits == "int4":  # random nibbles over [-3 sigma, 3 sigma]
            groups = group_count(shape[1], group_size)
            shard[name] = torch.randint(0, 256, (shape[0], -(-shape[1] // 2)),
                                        generator=generator, dtype=torch.uint8)
            shard[f"{name}_scales"] = torch.full((shape[0], groups), 0.12 / 15, dtype=torch.float16)
            shard[f"{name}_mins"] = torch.full((shape[0], groups), -0.06, dtype=torch.float16)
        elif name in quantized:  # integers drawn directly: 12B values in seconds, not minutes
            qmax = QMAX[bits]
            shard[name] = torch.randint(-qmax, qmax + 1, shape, generator=generator,
                                        dtype=INT_DTYPES[bits])
            shard[f"{name}_scale"] = torch.full(shape[:1], qmax / 0.06)  # |w| <= 3 sigma
        elif name.endswith("norm.weight"):
            shard[name] = torch.ones(shape, dtype=compute.torch_dtype)
        else:
            shard[name] = torch.randn(shape, generator=generator, dtype=compute.torch_dtype) * 0.02
        parts = (name, f"{name}_scale", f"{name}_scales", f"{name}_mins")
        size += sum(shard[key].nbytes for key in parts if key in shard)
        if size > SHARD_BYTES:
            flush()
            size = 0
    if shard:
        flush()
    KilnConfig(spec=spec, dtype=compute.dtype, weights=compute.weights, files=files,
               tokens=TokenIds(bos=0, eos=[0]), source={"format": "random"},
               group_size=group_size).save(folder)
    return folder
