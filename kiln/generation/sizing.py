"""How big an engine's KV pool is: the cache's dtype and the number of slots."""

from __future__ import annotations

import torch

from ..errors import OutOfMemory
from .config import DEFAULT_SLOTS, EngineConfig
from .loaded_model import LoadedModel
from .slots import KV_DTYPES, bytes_per_slot, parse_memory


def cpu_has_amx() -> bool:
    """AMX tiles: bfloat16 attention is faster than float32 only with them (measured: Intel
    Xeon with AMX 17-31% faster decoding, AMD EPYC with AVX-512 BF16 but no AMX 2x slower)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def kv_cache_dtype(loaded: LoadedModel, name: str) -> torch.dtype:
    """"auto" is bfloat16 for int8 weights on a CPU with AMX (within 0.1% of float32's
    perplexity on SmolLM2, and faster there), else the compute type's float type."""
    if name != "auto":
        return KV_DTYPES[name]
    compute = loaded.compute
    if loaded.device.type == "cpu" and compute.weights == "int8" and cpu_has_amx():
        return torch.bfloat16
    return compute.torch_dtype


def slot_count(loaded: LoadedModel, config: EngineConfig, slot_length: int,
               dtype: torch.dtype) -> int:
    """`max_batch_size` slots, or as many as `kv_cache_memory` holds; on CUDA at most half of
    the memory the weights left (the rest for activations and graphs)."""
    per_slot = bytes_per_slot(loaded.model.spec, slot_length, dtype)
    memory, wanted = config.kv_cache_memory, config.max_batch_size
    if memory is None and loaded.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(loaded.device)
        fits = free // 2 // per_slot
        if fits < 1:
            raise OutOfMemory(f"one sequence of {slot_length} positions needs "
                              f"{per_slot / 2**20:.0f} MiB of KV cache and {free / 2**20:.0f} "
                              "MiB are free; lower max_length or use kv_cache_dtype='bfloat16'")
        return min(wanted or DEFAULT_SLOTS, fits)
    if memory is None:
        return wanted or DEFAULT_SLOTS
    slots = parse_memory(memory) // per_slot
    if slots < 1:
        raise ValueError(f"kv_cache_memory={memory!r} is less than one sequence of "
                         f"{slot_length} positions needs ({per_slot / 2**20:.1f} MiB in "
                         f"{str(dtype).removeprefix('torch.')}); raise it or lower max_length")
    return min(slots, wanted or slots)
