"""Tensor parallelism over torch.distributed: each of N ranks holds 1/N of every layer.

    attention  qkv rows: the rank's query heads, key heads and value heads (column-parallel)
               out columns: the same query heads (row-parallel), summed across ranks
    MLP        up rows: the rank's slice of gate and of up (column-parallel)
               down columns: the same slice (row-parallel), summed across ranks

so each layer needs two all-reduces (after attention, after the MLP), and each rank's KV cache
holds only its key/value heads. Embedding, norms and the output head are replicated. Every
rank runs the same program on the same inputs (start it with torchrun); the sums make every
rank's hidden states, and so its logits and tokens, identical. Row-parallel biases are added
once, after the sum. Works for float, int8 and int4 weights (int4 slices must be whole
groups); the heads and the MLP width must divide by N.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .spec import ModelSpec

PARTS = ("", "_scale", "_scales", "_mins")  # a weight's stored tensors (kiln.quant.stored)


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int


def current_shard() -> Shard:
    """This process's place in the default process group (initialized from torchrun's
    environment when it is not yet)."""
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this PyTorch lacks")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend)
        except ValueError as error:
            raise RuntimeError("tensor parallelism runs one process per rank: start with "
                               "torchrun --nproc-per-node N ... (no RANK/WORLD_SIZE in the "
                               f"environment: {error})") from error
    return Shard(dist.get_rank(), dist.get_world_size())


def local_spec(spec: ModelSpec, world: int) -> ModelSpec:
    """The spec of one rank's layers: 1/world of the heads and of the MLP width."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(spec, name) % world:
            raise ValueError(f"tensor parallelism over {world} ranks needs {name} "
                             f"({getattr(spec, name)}) divisible by {world}")
    return dataclasses.replace(spec, num_heads=spec.num_heads // world,
                               num_kv_heads=spec.num_kv_heads // world,
                               intermediate_size=spec.intermediate_size // world)


def shard_state(state: dict[str, torch.Tensor], spec: ModelSpec, shard: Shard,
                group_size: int | None = None) -> dict[str, torch.Tensor]:
    """The rank's part of a full state dict (stored forms included: int8 scales, int4 groups)."""
    rank, world = shard.rank, shard.world
    heads, kv_heads, dim = spec.num_heads // world, spec.num_kv_heads // world, spec.head_dim
    width = spec.intermediate_size // world
    q_rows = torch.arange(rank * heads * dim, (rank + 1) * heads * dim)
    kv_rows = torch.arange(rank * kv_heads * dim, (rank + 1) * kv_heads * dim)
    qkv_rows = torch.cat([q_rows, spec.q_size + kv_rows, spec.q_size + spec.kv_size + kv_rows])
    mlp_rows = torch.arange(rank * width, (rank + 1) * width)
    up_rows = torch.cat([mlp_rows, spec.intermediate_size + mlp_rows]) if spec.gated_mlp \
        else mlp_rows
    out = dict(state)
    for layer in range(spec.num_layers):
        prefix = f"layers.{layer}."
        _rows(out, f"{prefix}attn.qkv", qkv_rows)
        _rows(out, f"{prefix}mlp.up", up_rows)
        _columns(out, f"{prefix}attn.out", rank * heads * dim, heads * dim, group_size)
        _columns(out, f"{prefix}mlp.down", rank * width, width, group_size)
    return out


def _rows(state: dict, module: str, rows: torch.Tensor) -> None:
    for part in (*(f".weight{p}" for p in PARTS), ".bias"):
        key = module + part
        if key in state:
            state[key] = state[key][rows.to(state[key].device)].contiguous()


def _columns(state: dict, module: str, start: int, size: int, group_size: int | None) -> None:
    weight = state[f"{module}.weight"]
    if f"{module}.weight_scales" in state:  # int4: packed pairs, then whole groups
        group = group_size or 32
        if start % group or size % group:
            raise ValueError(f"tensor parallelism with int4 groups of {group} needs each rank's "
                             f"{module} columns ({size}) in whole groups; use a smaller group "
                             "size or fewer ranks")
        state[f"{module}.weight"] = weight[:, start // 2:(start + size) // 2].contiguous()
        for part in ("_scales", "_mins"):
            key = f"{module}.weight{part}"
            state[key] = state[key][:, start // group:(start + size) // group].contiguous()
        return
    state[f"{module}.weight"] = weight[:, start:start + size].contiguous()  # row scales hold


class SummedLinear(nn.Module):
    """A row-parallel projection: the rank's partial product, summed over ranks, plus the
    bias once."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("summed_bias", bias, persistent=False)

    def forward(self, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
        y = self.inner(x, two_pass)
        if not y.is_contiguous():
            y = y.contiguous()
        dist.all_reduce(y)
        return y if self.summed_bias is None else y + self.summed_bias


def wrap_row_parallel(decoder: nn.Module) -> None:
    """Replace every out/down projection by its summed form, its bias taken out of it (so
    an int8 kernel packed afterwards does not add it on every rank)."""
    for layer in decoder.layers:
        for parent, name in ((layer.attn, "out"), (layer.mlp, "down")):
            inner = getattr(parent, name)
            bias = inner.bias.detach() if inner.bias is not None else None
            inner.bias = None
            setattr(parent, name, SummedLinear(inner, bias))
