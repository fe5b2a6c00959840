"""Integer weights: one float32 scale per output row, CTranslate2's convention.

    scale = qmax / max|W[row]|,   Wq = rint(W * scale),   W ~= Wq / scale

(qmax = 127 for int8, 32767 for int16), so CTranslate2's int8 tensors import as they are.
Embeddings are quantized the same way (a row lookup then needs no matmul). Only portable
tensors (`weight` int8/int16, `weight_scale` float32) are stored; a device kernel packs them
at load time (kiln/quant/kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_int8
from .kernels import Int8Kernel, make_int8_kernel

QMAX = {"int8": 127, "int16": 32767}
META = torch.device("meta")
INT_DTYPES = {"int8": torch.int8, "int16": torch.int16}


@dataclass
class IntegerWeight:
    """An already-quantized weight from a checkpoint (values, float32 scale per row): kept as
    it is when the target has the same integer type, never requantized."""

    values: torch.Tensor
    scale: torch.Tensor
    bits: str

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self) -> torch.Tensor:
        return dequantize_rows(self.values, self.scale)


def quantize_rows(weight: torch.Tensor, bits: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weight, float32 scale per row) with w ~= q / scale."""
    qmax = QMAX[bits]
    weight = weight.float()
    row_max = weight.abs().amax(dim=-1)
    scale = torch.where(row_max > 0, qmax / row_max, torch.ones_like(row_max))
    quantized = torch.round(weight * scale.unsqueeze(-1)).clamp(-qmax, qmax)
    return quantized.to(INT_DTYPES[bits]), scale


def dequantize_rows(quantized: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (quantized.float() / scale.float().unsqueeze(-1)).to(dtype)


class QuantizedLinear(nn.Module):
    """y = x Wq^T / scale + bias, run by a packed kernel chosen at load (`prepare`).

    `two_pass` says how the kernel quantizes activations, per token: two passes (~16 bits:
    prompts, scoring) or one 8-bit pass (decode steps). The caller passes what the forward
    pass is, never anything that depends on how many rows share it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        # Created empty on the meta device: the loader assigns the real tensors.
        self.register_buffer("weight", torch.empty(out_features, in_features,
                                                   dtype=INT_DTYPES[bits], device=META))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32,
                                                         device=META))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=META)) if bias else None
        self.kernel: Int8Kernel | None = None
        self._inverse_scale: torch.Tensor | None = None

    def prepare(self, backend: str | None) -> None:
        """Pack the weight for a kernel. int16 (and int8 without a backend) dequantize per call."""
        self._inverse_scale = (1.0 / self.weight_scale).contiguous()
        if self.bits == "int8" and backend is not None:
            self.kernel = make_int8_kernel(self.weight, self.weight_scale, self.bias, backend)
            self.weight = self.kernel.stored_weight  # None when the kernel holds its own copy
            # Registered on the module, so that tracing the decode step
            # (generation/static_step.py) may use it: a tensor as a (non-persistent) buffer,
            # fbgemm's object as an attribute.
            packed = getattr(self.kernel, "packed", None)
            if isinstance(packed, torch.Tensor):
                self.register_buffer("packed_weight", packed, persistent=False)
            elif packed is not None:
                self.packed_params = packed

    def forward(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
        if self.kernel is not None:  # the kernel adds the bias
            flat = x.reshape(-1, self.in_features)
            if two_pass or self.kernel.decodes:
                return self.kernel(flat, two_pass).view(*x.shape[:-1],
                                                        self.out_features).to(x.dtype)
        return self.weight_only(x)

    def weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize inside the matmul. On CUDA, float16/bfloat16 and up to MAX_ROWS rows:
        a Triton kernel that converts the int8 weight in registers (triton_int8.py).
        Otherwise the integer weight is cast to the activations' type (exact for int8 in
        float16/bfloat16/float32) and the row scales applied to the product, so no float copy
        of the weight outlives the call. int16 runs in float32."""
        if (self.bits == "int8" and x.dtype in (torch.float16, torch.bfloat16)
                and triton_int8.available(x.device)):
            flat = x.reshape(-1, self.in_features)
            if flat.shape[0] <= triton_int8.MAX_ROWS:
                y = triton_int8.linear(flat, self.weight, self.inverse_scale, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
        compute = x.dtype if self.bits == "int8" else torch.float32
        y = F.linear(x.to(compute), self.weight.to(compute)) * self.inverse_scale.to(compute)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias

    @property
    def inverse_scale(self) -> torch.Tensor:
        if self._inverse_scale is not None:
            return self._inverse_scale
        return 1.0 / self.weight_scale


class QuantizedEmbedding(nn.Module):
    """Rows of an integer table, each divided by its own scale when looked up."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: str,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim,
                                                   dtype=INT_DTYPES[bits], device=META))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32,
                                                         device=META))
        self.bits = bits
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(self.weight[ids], self.weight_scale[ids], self.dtype)
