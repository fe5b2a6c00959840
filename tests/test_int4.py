"""4-bit group-wise weights: quantization bounds, packing, and the CPU kernel against the
exact reference (dequantize, then matmul), for shapes the kernel takes and odd ones it does
not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.quant.int4 import Int4Linear, dequantize_groups, pack_nibbles, quantize_groups, unpack_nibbles


def weight(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("columns, group", [(256, 128), (256, 32), (100, 64), (33, 32)])
def test_dequantized_weight_is_within_half_a_step_per_group(columns, group):
    w = weight(12, columns)
    packed, scales, minimums = quantize_groups(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (12, (columns + 1) // 2)
    restored = dequantize_groups(packed, scales, minimums, columns, group)
    step = scales[:, torch.arange(columns) // group]
    assert ((restored - w).abs() <= step / 2 + 1e-5).all()
    # each group's extremes are represented exactly (0 and 15 map to min and max)
    assert torch.allclose(restored[:, :group].amin(dim=1), w[:, :group].amin(dim=1), atol=1e-5)


def test_nibbles_round_trip_for_odd_lengths():
    values = torch.randint(0, 16, (3, 7), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(values), 7), values)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernel_matches_the_reference(group, bias):
    w = weight(64, 256, seed=group)
    b = torch.randn(64) if bias else None
    layer = Int4Linear.from_float(w, b, group_size=group)
    assert layer.uses_kernel
    x = torch.randn(5, 3, 256)
    expected = F.linear(x, layer.dequantized(), b)
    got = layer(x)
    assert got.shape == expected.shape
    # the kernel takes bfloat16 activations: within bfloat16 rounding of the exact result
    assert (got - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
    assert got.dtype == x.dtype


@pytest.mark.parametrize("rows, columns", [(10, 100), (64, 200), (24, 256)])
def test_odd_shapes_take_the_exact_reference_path(rows, columns):
    w = weight(rows, columns, seed=1)
    layer = Int4Linear.from_float(w, torch.randn(rows), group_size=64)
    assert not layer.uses_kernel
    x = torch.randn(4, columns)
    assert torch.equal(layer(x), F.linear(x, layer.dequantized(), layer.bias))


def test_group_size_is_checked():
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_groups(weight(4, 64), 48)
