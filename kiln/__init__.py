"""kiln: convert Hugging Face causal LMs into compact folders and run them fast, on PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["GenerationResult", "Generator", "ModelSpec", "convert", "__version__"]

if TYPE_CHECKING:
    from .conversion import convert
    from .generation.results import GenerationResult
    from .generator import Generator
    from .model.spec import ModelSpec

_LAZY = {"convert": "conversion", "Generator": "generator", "GenerationResult": "generation.results",
         "ModelSpec": "model.spec"}


def __getattr__(name: str):
    # Lazy: `kiln --version` and `kiln --help` must not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
