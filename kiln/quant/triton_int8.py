"""Weight-only int8 matmul for CUDA in Triton: y = (x @ Wq^T) * inverse_scale + bias.

The int8 weight is read once, converted to the activations' type in registers and
multiplied with float32 accumulation (Pythia overflows float16 sums), so a decode step
streams 1 byte per weight instead of the 5 a dequantize-then-matmul costs (read int8, write
and read a float16 copy). Two kernels:

- one row (batch-1 decode): a GEMV, each program a few output rows over the whole K, so
  even a 5120-wide layer has hundreds of programs to keep the memory busy;
- a few rows (batched decode): tiles on the tensor cores (`tl.dot`), rows padded to 16.

Many rows (prompts) are compute-bound, where cuBLAS on a dequantized copy is the safer
choice (not yet measured against these kernels: gpu_check times both), so `linear` is only
used up to MAX_ROWS (see quant.QuantizedLinear).

K (the input width) is a compile-time constant: one compiled kernel per layer width, with
the loop bound known. Block sizes are tuned by Triton on first use per shape, outside any
CUDA graph capture (kiln warms a step up before capturing it). With TRITON_INTERPRET=1 the kernels run on CPU
tensors, with one fixed configuration: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import os

import torch

MAX_ROWS = 64
_kernels = None  # kiln.triton_kernels once imported; False when Triton is missing


def available(device: torch.device) -> bool:
    """Whether `linear` can run for tensors on `device` (imports Triton on first call)."""
    global _kernels
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter
    if device.type != "cuda" and not (interpreting and device.type == "cpu"):
        return False
    if _kernels is None:
        try:
            from . import triton_kernels
        except ImportError:  # no Triton: CUDA then dequantizes per call
            _kernels = False
        else:
            _kernels = triton_kernels
    return bool(_kernels)


def linear(x: torch.Tensor, weight: torch.Tensor, inverse_scale: torch.Tensor,
           bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] (float16/bfloat16, M <= MAX_ROWS) @ int8 weight [N, K]^T * inverse_scale [N]
    (float32) + bias [N] -> [M, N] in x's dtype. Call `available(x.device)` first."""
    rows, inner = x.shape
    outputs = weight.shape[0]
    if rows > MAX_ROWS or weight.dtype != torch.int8 or weight.shape[1] != inner:
        raise ValueError(f"triton_int8.linear takes x [M <= {MAX_ROWS}, K] and an int8 weight "
                         f"[N, K]; got {tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if not available(x.device):
        raise RuntimeError(f"the Triton int8 kernels need CUDA and Triton; got {x.device}")
    x = x.contiguous()
    y = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else inverse_scale  # never read without HAS_BIAS
    if rows == 1:
        grid = lambda meta: (-(-outputs // meta["BLOCK_N"]),)  # noqa: E731
        _kernels.gemv_kernel[grid](x, weight, inverse_scale, bias_arg, y, outputs, inner,
                           HAS_BIAS=has_bias)
    else:
        bucket = 16 if rows <= 16 else (32 if rows <= 32 else 64)
        grid = lambda meta: (-(-rows // meta["BLOCK_M"]),  # noqa: E731
                             -(-outputs // meta["BLOCK_N"]))
        _kernels.tile_kernel[grid](x, weight, inverse_scale, bias_arg, y, rows, outputs, inner, bucket,
                           HAS_BIAS=has_bias)
    return y
