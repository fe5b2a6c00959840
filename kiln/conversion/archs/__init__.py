"""Adapters from foreign model configs and weight names to kiln's ModelSpec and names.

Each family is one small module registering an `Adapter` for its `model_type` values.
"""

from .registry import Adapter, get_adapter, register, supported_model_types

# Importing a family registers it.
from . import gpt2, gpt_neox, llama  # noqa: E402,F401  isort: skip

__all__ = ["Adapter", "get_adapter", "register", "supported_model_types"]
