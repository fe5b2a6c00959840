"""GGUF's 4-bit blocks read as kiln int4 groups of 32, without going through float.

    Q4_0  18 bytes / 32 weights: d (f16), 16 bytes of nibbles     w = d * (q - 8)
    Q4_1  20 bytes / 32 weights: d, m (f16), 16 bytes of nibbles  w = d * q + m
    Q4_K  144 bytes / 256 weights: d, dmin (f16), 12 bytes of 6-bit sub-block scales and
          minimums, 128 bytes of nibbles; 8 sub-blocks of 32       w = d*sc_j * q - dmin*m_j

In a 32-weight block, byte i holds weight i (low nibble) and weight i + 16 (high nibble); in
a Q4_K 64-weight chunk, byte i holds weights i and i + 32. kiln's groups hold (scale, min)
with w = q * scale + min: Q4_0 and Q4_1 map exactly (min = -8d is exact in float16); a Q4_K
sub-block's d * sc_j is rounded to float16 (2^-11 relative, well under the kernels' bfloat16).
"""

from __future__ import annotations

import numpy as np
import torch

from ...quant.int4 import GroupWeight, pack_nibbles

GROUP = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q4_K": 144}
BLOCK_WEIGHTS = {"Q4_0": 32, "Q4_1": 32, "Q4_K": 256}
NATIVE_TYPES = tuple(BLOCK_BYTES)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _block_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] values: weights 0..15 in the low nibbles, 16..31 in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes -> (8 scales, 8 minimums), 6 bits each."""
    packed = packed.reshape(-1, 3, 4)
    d, m, high = packed[:, 0], packed[:, 1], packed[:, 2]
    scales = np.concatenate([d & 0x3F, (high & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    minimums = np.concatenate([m & 0x3F, (high >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), minimums.astype(np.float32)


def group_weight(raw: np.ndarray, kind: str, rows: int, columns: int) -> GroupWeight:
    """The GroupWeight (groups of 32) of a GGUF tensor of `kind` whose PyTorch shape is
    [rows, columns], from its raw bytes."""
    if columns % BLOCK_WEIGHTS[kind]:
        raise ValueError(f"a {kind} tensor needs rows of whole {BLOCK_WEIGHTS[kind]}-weight "
                         f"blocks, got {columns} columns")
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, BLOCK_BYTES[kind])
    if blocks.shape[0] != rows * columns // BLOCK_WEIGHTS[kind]:
        raise ValueError(f"{kind} data holds {blocks.shape[0]} blocks, [{rows}, {columns}] "
                         f"needs {rows * columns // BLOCK_WEIGHTS[kind]}")
    if kind == "Q4_0":
        scales = _f16(blocks[:, 0:2])
        minimums = -8.0 * scales
        values = _block_nibbles(blocks[:, 2:])
    elif kind == "Q4_1":
        scales, minimums = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        values = _block_nibbles(blocks[:, 4:])
    else:
        d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
        sub_scales, sub_minimums = _k_scales(blocks[:, 4:16])
        scales = (d[:, None] * sub_scales).reshape(-1)
        minimums = -(dmin[:, None] * sub_minimums).reshape(-1)
        chunks = blocks[:, 16:].reshape(-1, 4, 32)  # 64-weight chunks: low nibbles, then high
        values = np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, GROUP)
    if not (np.isfinite(np.float16(scales)).all() and np.isfinite(np.float16(minimums)).all()):
        raise OverflowError(f"{kind} scales beyond float16's range")
    groups = columns // GROUP
    values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.uint8)).view(rows, columns)
    return GroupWeight(
        packed=pack_nibbles(values),
        scales=torch.from_numpy(np.asarray(scales, np.float32)).view(rows, groups).half(),
        minimums=torch.from_numpy(np.asarray(minimums, np.float32)).view(rows, groups).half(),
        columns=columns, group_size=GROUP)
