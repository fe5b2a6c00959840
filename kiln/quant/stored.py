"""How a quantizable weight is stored, and turning one stored form into another.

A projection or embedding NAME is stored in one of three forms:

    float      NAME                                   (the folder's float type)
    int8/int16 NAME, NAME_scale                       (kiln.quant.int8: a scale per row)
    int4       NAME, NAME_scales, NAME_mins           (kiln.quant.int4: 4-bit groups)

Conversion and loading both go through `encode`, which passes a weight through untouched
when it is already in the target form and otherwise dequantizes it and quantizes it again.
An int4 model keeps its token embedding and output head in int8: they are looked up row by
row (the embedding) or hold the most sensitive weights (the head).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .int4 import DEFAULT_GROUP_SIZE, GroupWeight, quantize_groups
from .int8 import INT_DTYPES, IntegerWeight, quantize_rows

AnyWeight = torch.Tensor | IntegerWeight | GroupWeight
KEPT_IN_INT8 = ("embed.weight", "lm_head.weight")


def weight_type(name: str, weights: str | None) -> str | None:
    """The stored type of quantizable weight `name` in a model whose weights are `weights`."""
    if weights == "int4" and name in KEPT_IN_INT8:
        return "int8"
    return weights


def part_dtypes(name: str, bits: str | None, float_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The stored tensors of one weight, with their dtypes."""
    if bits is None:
        return {name: float_dtype}
    if bits == "int4":
        return {name: torch.uint8, f"{name}_scales": torch.float16, f"{name}_mins": torch.float16}
    return {name: INT_DTYPES[bits], f"{name}_scale": torch.float32}


def take_stored(tensors: dict[str, torch.Tensor], name: str, columns: int,
                group_size: int | None) -> AnyWeight:
    """Pop weight `name` in whatever form `tensors` holds it (`columns`: its input size,
    which 4-bit packing rounds up to even)."""
    values = tensors.pop(name)
    if f"{name}_scale" in tensors:
        scale = tensors.pop(f"{name}_scale")
        bits = {torch.int8: "int8", torch.int16: "int16"}.get(values.dtype)
        if bits is None:
            raise ValueError(f"tensor {name} has a row scale but dtype {values.dtype}")
        return IntegerWeight(values, scale, bits)
    if f"{name}_scales" in tensors:
        return GroupWeight(values, tensors.pop(f"{name}_scales"), tensors.pop(f"{name}_mins"),
                           columns, group_size or DEFAULT_GROUP_SIZE)
    return values


def is_form(weight: AnyWeight, bits: str | None, group_size: int | None) -> bool:
    """Whether `weight` is already stored as `bits` (and, for int4, in these groups)."""
    if isinstance(weight, GroupWeight):
        return bits == "int4" and weight.group_size == (group_size or DEFAULT_GROUP_SIZE)
    if isinstance(weight, IntegerWeight):
        return weight.bits == bits
    return bits is None


def parts(name: str, weight: AnyWeight) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors of a weight already in its target form."""
    if isinstance(weight, GroupWeight):
        yield name, weight.packed.contiguous()
        yield f"{name}_scales", weight.scales.contiguous()
        yield f"{name}_mins", weight.minimums.contiguous()
    elif isinstance(weight, IntegerWeight):
        yield name, weight.values.contiguous()
        yield f"{name}_scale", weight.scale.contiguous()
    else:
        yield name, weight


def encode(name: str, weight: AnyWeight, bits: str | None, group_size: int | None,
           float_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors of `weight` as type `bits` (None: float in `float_dtype`)."""
    if is_form(weight, bits, group_size):
        if bits is None:
            weight = weight.to(float_dtype)
        yield from parts(name, weight)
        return
    if not isinstance(weight, torch.Tensor):
        weight = weight.dequantize()
    if bits is None:
        yield name, weight.to(float_dtype).contiguous()
    elif bits == "int4":
        yield from parts(name, quantize_groups(weight, group_size or DEFAULT_GROUP_SIZE))
    else:
        integers, scale = quantize_rows(weight, bits)
        yield name, integers
        yield f"{name}_scale", scale
