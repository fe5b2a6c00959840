"""CTranslate2's compute types: which weights are integers and which float type runs the rest.

    float32 | float16 | bfloat16               float weights, float activations
    int8_float32 | int8_float16 | int8_bfloat16 int8 weights (one scale per row), float rest
    int8                                       int8 weights, the saved model's float type
    int4_float32 | int4_float16 | int4_bfloat16 4-bit weights in groups (kiln's own: embedding
    int4                                       and output head stay int8), float rest
    int16                                      int16 weights, float32 rest
    default                                    what the folder stores (falling back where the
                                               device cannot run it)
    auto                                       the fastest faithful type for the device
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when used: `kiln --help` stays instant
    import torch

FLOATS = ("float32", "float16", "bfloat16")
NAMED = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
         "int4", "int4_float32", "int4_float16", "int4_bfloat16", *FLOATS)
GROUPED = "int4"  # the one weight type with a group size
GROUP_SIZES = (32, 64, 128, 256)  # int4: input columns per scale and minimum
DEFAULT_GROUP_SIZE = 32  # measured on SmolLM2 and chosen: see BENCHMARKS.md, "int4"
COMPUTE_TYPES = ("default", "auto", *NAMED)


@dataclass(frozen=True)
class ComputeType:
    weights: str | None  # "int8", "int16", "int4" or None (float weights)
    dtype: str  # float type of activations and of the weights that stay float
    group_size: int | None = None  # int4 only: input columns per scale (None: the default)

    @property
    def name(self) -> str:
        if self.weights in ("int8", GROUPED):
            return f"{self.weights}_{self.dtype}"
        return self.weights or self.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @classmethod
    def parse(cls, name: str, saved_dtype: str = "float32") -> ComputeType:
        """A named type; `int8` keeps the saved float type, as in CTranslate2."""
        if name in FLOATS:
            return cls(None, name)
        if name == "int16":
            return cls("int16", "float32")
        if name in ("int8", GROUPED):
            return cls(name, saved_dtype)
        if name[:5] in ("int8_", "int4_") and name[5:] in FLOATS:
            return cls(name[:4], name[5:])
        raise ValueError(f"unknown compute type {name!r}; valid: {', '.join(COMPUTE_TYPES)}")


def supported(device: torch.device) -> list[str]:
    """Explicit types the device can run."""
    if device.type == "cuda":
        import torch

        bf16 = torch.cuda.is_bf16_supported()
        return [name for name in NAMED if name != "int16" and (bf16 or "bfloat16" not in name)]
    return list(NAMED)


def resolve(requested: str, saved: ComputeType, device: torch.device) -> ComputeType:
    """The type to run in on this device, or a ValueError listing the valid ones."""
    valid = supported(device)
    if requested not in COMPUTE_TYPES:
        raise ValueError(f"unknown compute_type {requested!r}; valid on {device.type}: "
                         f"{', '.join(['default', 'auto', *valid])}")
    if requested == "auto":
        if device.type == "cuda":
            return ComputeType("int8", "bfloat16" if "bfloat16" in valid else "float16")
        return ComputeType("int8", "float32")
    if requested == "default":
        if saved.name in valid:
            return saved
        fallback = "float16" if device.type == "cuda" else "float32"  # CTranslate2 does the same
        kept = saved.weights if saved.weights in ("int8", GROUPED) else None
        return ComputeType(kept, fallback, saved.group_size if kept == GROUPED else None)
    chosen = ComputeType.parse(requested, saved.dtype)
    if chosen.weights == GROUPED and saved.weights == GROUPED:
        chosen = ComputeType(GROUPED, chosen.dtype, saved.group_size)  # the folder's groups
    if chosen.name not in valid:
        raise ValueError(f"compute_type {requested!r} cannot run on {device}; valid there: "
                         f"{', '.join(['default', 'auto', *valid])}")
    return chosen
