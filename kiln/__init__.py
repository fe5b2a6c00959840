"""kiln: convert Hugging Face causal LMs into compact folders and run them fast, on PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "Encoder", "Engine", "EngineConfig", "EngineDeadError", "FinishReason",
           "GenerationOptions", "GenerationResult", "Generator", "KilnError", "ModelFileError",
           "ModelSpec", "OutOfMemory", "RequestError", "TokenEvent", "Translator", "convert", "__version__"]

if TYPE_CHECKING:
    from .encoder import Encoder
    from .errors import EngineDeadError, KilnError, ModelFileError, OutOfMemory, RequestError
    from .generation.async_engine import AsyncEngine
    from .generation.config import EngineConfig
    from .generation.engine import Engine
    from .generation.events import FinishReason, TokenEvent
    from .generation.options import GenerationOptions
    from .generation.results import GenerationResult
    from .generator import Generator
    from .model.spec import ModelSpec
    from .sources.hub import convert_source as convert
    from .translator import Translator

# name -> (module, attribute); `convert` takes hub ids too, so it is the sources-level one.
_LAZY = {"convert": ("sources.hub", "convert_source"), "Generator": ("generator", "Generator"),
         "Encoder": ("encoder", "Encoder"), "Translator": ("translator", "Translator"),
         "GenerationResult": ("generation.results", "GenerationResult"),
         "ModelSpec": ("model.spec", "ModelSpec"),
         "Engine": ("generation.engine", "Engine"), "TokenEvent": ("generation.events", "TokenEvent"),
         "EngineConfig": ("generation.config", "EngineConfig"),
         "FinishReason": ("generation.events", "FinishReason"),
         "AsyncEngine": ("generation.async_engine", "AsyncEngine"),
         "GenerationOptions": ("generation.options", "GenerationOptions"),
         **{name: ("errors", name) for name in ("KilnError", "RequestError", "ModelFileError",
                                                 "OutOfMemory", "EngineDeadError")}}


def __getattr__(name: str):
    # Lazy: `kiln --version` and `kiln --help` must not pay for importing torch.
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attribute)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
