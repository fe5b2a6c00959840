"""4-bit weights, group-wise asymmetric: each run of `group_size` input columns of a row has
its own float scale and minimum,

    q = clamp(round((w - min) / scale), 0, 15),   w ~= q * scale + min,   scale = (max - min) / 15

stored two values per byte (low nibble first). `Int4Linear` runs them through PyTorch's own
CPU kernel (`_weight_int4pack_mm_for_cpu`, which takes the tinygemm layout: scales and
"zeros" per group where w = (q - 8) * scale + zero, i.e. zero = min + 8 * scale) when the
shape suits it, and otherwise through the exact reference path: dequantize, then matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP_SIZES = (32, 64, 128, 256)
LEVELS = 15
MID = 8  # tinygemm's zero point: w = (q - 8) * scale + zero


def quantize_groups(weight: torch.Tensor, group_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [N, ceil(K/2)], scales [N, groups], minimums [N, groups]) of a float
    weight [N, K]; a last, shorter group is quantized on its own values."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    rows, columns = weight.shape
    groups = -(-columns // group_size)
    padded = F.pad(weight.float(), (0, groups * group_size - columns))
    grouped = padded.view(rows, groups, group_size)
    valid = (torch.arange(groups * group_size) < columns).view(1, groups, group_size)
    low = grouped.masked_fill(~valid, float("inf")).amin(dim=-1)
    high = grouped.masked_fill(~valid, float("-inf")).amax(dim=-1)
    scales = (high - low) / LEVELS
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant groups
    values = torch.round((grouped - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, LEVELS)
    values = values.view(rows, -1)[:, :columns].to(torch.uint8)
    return pack_nibbles(values), scales, low


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] -> [N, ceil(K/2)], element 2i in the low nibble."""
    if values.shape[-1] % 2:
        values = F.pad(values, (0, 1))
    return values[..., 0::2] | (values[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, columns: int) -> torch.Tensor:
    values = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(*packed.shape[:-1], -1)
    return values[..., :columns]


def dequantize_groups(packed: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
                      columns: int, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] the packed values stand for."""
    values = unpack_nibbles(packed, columns).float()
    expand = torch.arange(columns, device=packed.device) // group_size
    return values * scales[:, expand] + minimums[:, expand]


def cpu_kernel_available() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4 bits (see the module docstring). The CPU kernel runs
    in bfloat16 (activations and group scales rounded to 8-bit mantissas); the reference path
    in the input's type."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor,
                 in_features: int, group_size: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.group_size = group_size
        self.packed, self.scales, self.minimums, self.bias = packed, scales, minimums, bias
        self._kernel = None
        if packed.device.type == "cpu" and cpu_kernel_available() and self._kernel_shape_ok():
            values = unpack_nibbles(packed, in_features).to(torch.int32)
            # bfloat16 activations and scales: the kernel's fast path (0.55 ms for an
            # 8192 x 2048 weight on 2 AMD EPYC cores, 15 ms with float32 inputs).
            self._kernel = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1),
                            torch.stack([scales, minimums + MID * scales], dim=-1)
                            .transpose(0, 1).contiguous().to(torch.bfloat16))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = 128) -> Int4Linear:
        packed, scales, minimums = quantize_groups(weight, group_size)
        return cls(packed, scales, minimums, weight.shape[1], group_size, bias)

    def _kernel_shape_ok(self) -> bool:
        """The CPU kernel takes whole groups and row counts it can tile."""
        return self.in_features % self.group_size == 0 and self.out_features % 16 == 0

    @property
    def uses_kernel(self) -> bool:
        return self._kernel is not None

    def dequantized(self) -> torch.Tensor:
        return dequantize_groups(self.packed, self.scales, self.minimums, self.in_features,
                                 self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None:
            weight, scales_and_zeros = self._kernel
            flat = x.reshape(-1, self.in_features)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(scales_and_zeros.dtype), weight, self.group_size, scales_and_zeros)
            out = out.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return out + self.bias if self.bias is not None else out
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)
