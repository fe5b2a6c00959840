"""Rotary position embeddings: the cos/sin table of every position (with rope scaling) and
the rotate-half rotation of queries and keys."""

from __future__ import annotations

import math

import torch
from torch import nn

from .spec import ModelSpec


class RotaryTable(nn.Module):
    """cos/sin for every position of the context, in float32, rotate-half layout."""

    def __init__(self, spec: ModelSpec, device: torch.device | str | None = None) -> None:
        super().__init__()
        half = torch.arange(0, spec.rotary_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (spec.rotary_base ** (half / spec.rotary_dim))
        if spec.rope_scaling is not None:
            inv_freq = scaled_inverse_frequencies(inv_freq, spec.rope_scaling)
        positions = torch.arange(spec.max_position_embeddings, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype):
        # Padding rows carry the cache's scratch position, which may lie past the context.
        positions = positions.clamp(max=self.cos.shape[0] - 1)
        cos = self.cos[positions].to(dtype).unsqueeze(2)
        sin = self.sin[positions].to(dtype).unsqueeze(2)
        return cos, sin


def scaled_inverse_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Context-extension rope scalings: 'linear' (positions / factor) and 'llama3'
    (long wavelengths / factor, short ones kept, a smooth blend between)."""
    factor = scaling["factor"]
    if scaling["type"] == "linear":
        return inv_freq / factor
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, blended, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading rotary_dim dims of each head (rotate-half); the rest pass through."""
    rotary_dim = cos.shape[-1]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rotated.chunk(2, dim=-1)
    rotated = rotated * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, passed), dim=-1) if passed.shape[-1] else rotated
