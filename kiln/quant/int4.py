"""4-bit weights, group-wise asymmetric: each run of `group_size` input columns of a row has
its own scale and minimum (float16, like llama.cpp's Q4_1 blocks),

    q = clamp(round((w - min) / scale), 0, 15),   w ~= q * scale + min,   scale = (max - min) / 15

stored two values per byte (element 2i in the low nibble). A kiln folder holds, for each
int4 projection NAME: `NAME` (uint8 [N, ceil(K/2)]), `NAME_scales` and `NAME_mins` (float16
[N, ceil(K/group)]). A last, shorter group is quantized on its own values.

`Int4Linear` runs them through PyTorch's own kernels, which take the tinygemm layout (a
"zero" per group with w = (q - 8) * scale + zero, i.e. zero = min + 8 * scale, in bfloat16):

    CPU   torch.ops.aten._weight_int4pack_mm_for_cpu   (PyTorch >= 2.6)
    CUDA  torch.ops.aten._weight_int4pack_mm            (tinygemm; uint8 input, PyTorch >= 2.5)

Both take bfloat16 activations. Shapes they cannot tile are padded (input columns to whole
groups with zero activations, output rows to a multiple of 16), so every projection takes the
kernel where it exists; elsewhere the exact reference path runs: dequantize, then matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .compute_types import DEFAULT_GROUP_SIZE, GROUP_SIZES

LEVELS = 15
MID = 8  # tinygemm's zero point: w = (q - 8) * scale + zero
SCALE_DTYPE = torch.float16
META = torch.device("meta")
ROW_TILE = 16  # output rows the kernels tile by
PACK_ROWS = 1024  # rows packed at a time for the CPU kernel (a multiple of its 64-row blocks)


def check_group_size(group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                         f"got {group_size}")
    return group_size


def group_count(columns: int, group_size: int) -> int:
    return -(-columns // group_size)


@dataclass
class GroupWeight:
    """A 4-bit weight [N, K] as kiln stores it; carried through conversion without going
    through float when source and target agree (GGUF Q4_0/Q4_1/Q4_K blocks)."""

    packed: torch.Tensor  # uint8 [N, ceil(K/2)]
    scales: torch.Tensor  # float16 [N, groups]
    minimums: torch.Tensor  # float16 [N, groups]
    columns: int
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], self.columns))

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.packed, self.scales, self.minimums, self.columns,
                                 self.group_size)

    def rows(self, index: torch.Tensor) -> GroupWeight:
        """The weight of these rows (a row permutation, e.g. undoing llama.cpp's q/k order)."""
        return GroupWeight(self.packed[index], self.scales[index], self.minimums[index],
                           self.columns, self.group_size)

    @staticmethod
    def cat(parts: list[GroupWeight]) -> GroupWeight:
        """Rows of several weights stacked (qkv, gate + up), when they share columns and groups."""
        first = parts[0]
        if any(p.columns != first.columns or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot stack 4-bit weights with different columns or group sizes")
        return GroupWeight(torch.cat([p.packed for p in parts]),
                           torch.cat([p.scales for p in parts]),
                           torch.cat([p.minimums for p in parts]), first.columns,
                           first.group_size)


def quantize_groups(weight: torch.Tensor, group_size: int) -> GroupWeight:
    """Round-to-nearest 4-bit groups of a float weight [N, K]. Scales and minimums are rounded
    to float16 first, and the values computed against the rounded ones."""
    check_group_size(group_size)
    rows, columns = weight.shape
    groups = group_count(columns, group_size)
    padded = F.pad(weight.float(), (0, groups * group_size - columns))
    grouped = padded.view(rows, groups, group_size)
    valid = (torch.arange(groups * group_size, device=weight.device) < columns).view(1, groups, -1)
    low = grouped.masked_fill(~valid, float("inf")).amin(dim=-1)
    high = grouped.masked_fill(~valid, float("-inf")).amax(dim=-1)
    scales = ((high - low) / LEVELS).to(SCALE_DTYPE)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # constant groups
    minimums = low.to(SCALE_DTYPE)
    values = torch.round((grouped - minimums.float().unsqueeze(-1))
                         / scales.float().unsqueeze(-1)).clamp(0, LEVELS)
    values = values.view(rows, -1)[:, :columns].to(torch.uint8)
    return GroupWeight(pack_nibbles(values), scales, minimums, columns, group_size)


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
    return values * scales.float()[:, expand] + minimums.float()[:, expand]


def cpu_kernel_available() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def cuda_kernel_available() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack"))


def _inner_k_tiles(columns: int) -> int:
    """tinygemm's inner K tiling: the largest of 8/4/2 whose 16-column tiles divide K."""
    return next(tiles for tiles in (8, 4, 2) if columns % (tiles * 16) == 0)


class Int4Linear(nn.Module):
    """y = x W^T + b with W in 4-bit groups (see the module docstring). Built empty on the
    meta device; the loader assigns the stored tensors and calls `prepare`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = check_group_size(group_size)
        groups = group_count(in_features, group_size)
        self.register_buffer("weight", torch.empty(out_features, -(-in_features // 2),
                                                   dtype=torch.uint8, device=META))
        self.register_buffer("weight_scales", torch.empty(out_features, groups,
                                                          dtype=SCALE_DTYPE, device=META))
        self.register_buffer("weight_mins", torch.empty(out_features, groups,
                                                        dtype=SCALE_DTYPE, device=META))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=META)) if bias else None
        self.kernel: str | None = None  # "cpu" or "cuda" once prepared with a kernel
        self._padded_columns = in_features

    @classmethod
    def from_groups(cls, weight: GroupWeight, bias: torch.Tensor | None = None,
                    kernel: bool = True) -> Int4Linear:
        rows, columns = weight.shape
        layer = cls(columns, rows, bias is not None, weight.group_size,
                    bias.dtype if bias is not None else torch.float32)
        layer.weight, layer.weight_scales, layer.weight_mins = (
            weight.packed, weight.scales.to(SCALE_DTYPE), weight.minimums.to(SCALE_DTYPE))
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        if kernel:
            layer.prepare()
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   group_size: int = DEFAULT_GROUP_SIZE, kernel: bool = True) -> Int4Linear:
        return cls.from_groups(quantize_groups(weight, group_size), bias, kernel)

    def drop_stored(self) -> None:
        """Free the stored form once the kernel holds its own copy (weights quantized at load:
        nothing maps them from a file)."""
        if self.kernel is None:
            raise RuntimeError("drop_stored() before a kernel is packed would lose the weight")
        self.weight = self.weight_scales = self.weight_mins = None

    def stored(self) -> GroupWeight:
        if self.weight is None:
            raise RuntimeError("this layer's stored 4-bit weight was freed after packing "
                               "(quantized at load); load from a kiln int4 folder to keep it")
        return GroupWeight(self.weight, self.weight_scales, self.weight_mins, self.in_features,
                           self.group_size)

    def dequantized(self) -> torch.Tensor:
        return self.stored().dequantize()

    @property
    def uses_kernel(self) -> bool:
        return self.kernel is not None

    def prepare(self) -> bool:
        """Pack the weight for the device's kernel, when it has one; True if packed. The
        stored tensors stay (the reference path and `dequantized` read them); the loader
        releases their pages."""
        device = self.weight.device
        if device.type == "cpu" and cpu_kernel_available():
            self._pack(kind="cpu")
        elif device.type == "cuda" and cuda_kernel_available():
            try:
                self._pack(kind="cuda")
                self._check_against_reference()
            except Exception as error:  # noqa: BLE001 - any failure means: use the exact path
                warnings.warn(f"the CUDA int4 kernel is unavailable here ({type(error).__name__}: "
                              f"{error}); a {self.out_features}x{self.in_features} projection "
                              "runs the exact (slower) reference path", RuntimeWarning,
                              stacklevel=2)
                self.kernel = None
                for name in ("kernel_weight", "kernel_scales_and_zeros"):
                    self._buffers.pop(name, None)
        return self.kernel is not None

    def _pack(self, kind: str) -> None:
        columns = group_count(self.in_features, self.group_size) * self.group_size
        rows = -(-self.out_features // ROW_TILE) * ROW_TILE
        groups = columns // self.group_size
        scales = F.pad(self.weight_scales.float(), (0, groups - self.weight_scales.shape[1],
                                                    0, rows - self.out_features), value=1.0)
        minimums = F.pad(self.weight_mins.float(), (0, groups - self.weight_mins.shape[1],
                                                    0, rows - self.out_features))
        scales_and_zeros = (torch.stack([scales, minimums + MID * scales], dim=-1)
                            .transpose(0, 1).contiguous().to(torch.bfloat16))
        if kind == "cpu":
            # Rows are packed independently, so a few at a time: the int32 values the
            # packing takes would otherwise need 8x the stored weight at once.
            packed = torch.empty(rows, columns // 2, dtype=torch.uint8)
            for start in range(0, rows, PACK_ROWS):
                values = self._values(start, min(start + PACK_ROWS, rows), columns)
                packed[start:start + values.shape[0]] = \
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.to(torch.int32), 1)
        else:
            values = self._values(0, rows, columns)
            high_first = (values[:, 0::2] << 4 | values[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(high_first.contiguous(),
                                                                _inner_k_tiles(columns))
        # Buffers (not persistent): the traced decode step reads them as module state.
        self.register_buffer("kernel_weight", packed, persistent=False)
        self.register_buffer("kernel_scales_and_zeros", scales_and_zeros, persistent=False)
        self._padded_columns, self.kernel = columns, kind

    def _values(self, start: int, end: int, columns: int) -> torch.Tensor:
        """The 4-bit values of rows start..end (zero past the real rows and columns)."""
        values = unpack_nibbles(self.weight[start:min(end, self.out_features)], self.in_features)
        return F.pad(values, (0, columns - self.in_features, 0, end - start - values.shape[0]))

    def _check_against_reference(self) -> None:
        """The CUDA kernel is checked once at load against the exact path: a layout or
        version mismatch must not pass silently."""
        x = torch.randn(2, self.in_features, device=self.weight.device, dtype=torch.bfloat16)
        got = self._kernel_matmul(x).float()
        expected = F.linear(x.float(), self.dequantized())
        error = (got - expected).abs().max().item()
        if not error <= 2e-2 * expected.abs().max().item() + 1e-3:
            raise RuntimeError(f"kernel output differs from the reference by {error:.3g}")

    def _kernel_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat.to(torch.bfloat16)
        if self._padded_columns != self.in_features:
            x = F.pad(x, (0, self._padded_columns - self.in_features))
        if self.kernel == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.kernel_weight, self.group_size, self.kernel_scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm(
                x.contiguous(), self.kernel_weight, self.group_size, self.kernel_scales_and_zeros)
        return out[:, : self.out_features]

    def forward(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:  # noqa: ARG002
        # two_pass: how int8 kernels quantize activations; int4 kernels take them as they are.
        if self.kernel is not None:
            flat = x.reshape(-1, self.in_features)
            out = self._kernel_matmul(flat).reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            out = F.linear(x, self.dequantized().to(x.dtype))
        return out if self.bias is None else out + self.bias
