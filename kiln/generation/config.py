"""EngineConfig: everything that sizes and drives an engine, checked once.

Generator, Engine, AsyncEngine, the CLI and the server all build one of these instead of
passing keyword lists through each layer. The loading fields are what `open_model` takes;
they are ignored when the engine is handed a model that is already loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .slots import KV_DTYPES

DEFAULT_SLOTS = 16
PREFILL_TOKENS_PER_STEP = {"cpu": 512, "cuda": 8192}  # a GPU wants big GEMMs
LOAD_FIELDS = ("device", "compute_type", "device_index", "intra_threads", "int8_backend",
               "group_size", "tensor_parallel", "verify_checksums", "cache_dir")


@dataclass(frozen=True)
class EngineConfig:
    # -- what to load
    device: str = "cpu"
    compute_type: str = "default"
    device_index: int = 0
    intra_threads: int = 0
    int8_backend: str = "auto"
    group_size: int | None = None  # int4 groups when quantizing to int4 at load
    tensor_parallel: bool = False  # this process is one torchrun rank
    verify_checksums: bool = False
    cache_dir: str | Path | None = None  # the converted-model store
    # -- the KV slot pool
    max_batch_size: int | None = None  # slots (default 16; on CUDA fewer if memory is short)
    max_length: int | None = None  # positions per slot (default: the model's context)
    kv_cache_memory: int | str | None = None  # e.g. "2GiB": as many slots as that holds
    kv_cache_dtype: str = "auto"
    # -- stepping
    max_prefill_tokens_per_step: int | None = None  # default 512 on CPU, 8192 on CUDA
    seed: int | None = None  # the engine's random stream (requests without a seed)
    static_decode: bool = True  # decode steps captured once and replayed
    # None: a loop thread of the engine's own, except for tensor-parallel ranks, which must
    # run identical steps and so step in the thread that waits (see Engine).
    threaded: bool | None = None
    # -- speculative decoding
    draft_model: Any = None  # a folder, hub id or LoadedModel proposing tokens
    draft_compute_type: str = "default"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_length", "max_prefill_tokens_per_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int (or None for the default), "
                                 f"got {value!r}")
        if self.kv_cache_dtype not in ("auto", *KV_DTYPES):
            raise ValueError(f"kv_cache_dtype must be one of auto, {', '.join(KV_DTYPES)}; got "
                             f"{self.kv_cache_dtype!r}")

    @classmethod
    def from_options(cls, **options) -> EngineConfig:
        """A config from keyword arguments; an unknown name is a TypeError listing the known."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TypeError(f"unexpected engine option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(FIELDS)}")
        return cls(**options)

    def replace(self, **changes) -> EngineConfig:
        if not changes:
            return self
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"unexpected engine option(s) {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def load_options(self) -> dict:
        """The keyword arguments of `open_model` (after the model path)."""
        return {name: getattr(self, name) for name in LOAD_FIELDS}

    @property
    def runs_own_loop(self) -> bool:
        return (not self.tensor_parallel) if self.threaded is None else self.threaded

    def prefill_budget(self, device_type: str) -> int:
        return self.max_prefill_tokens_per_step or PREFILL_TOKENS_PER_STEP.get(device_type, 512)


FIELDS = tuple(field.name for field in dataclasses.fields(EngineConfig))
SIZING_FIELDS = tuple(name for name in FIELDS if name not in LOAD_FIELDS)
