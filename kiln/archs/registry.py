"""model_type -> Adapter. An unsupported type fails listing the supported ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ..spec import ModelSpec, TokenIds

# A lazily loaded checkpoint tensor: called, it returns the tensor.
TensorSource = Mapping[str, Callable[[], torch.Tensor]]


class Adapter:
    """Maps one family's Hugging Face config and weights to kiln's."""

    model_types: tuple[str, ...] = ()

    def spec_from_config(self, config: dict[str, Any],
                         tokenizer_vocab_size: int | None) -> ModelSpec:
        raise NotImplementedError

    def convert_weights(self, spec: ModelSpec,
                        tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (kiln name, tensor) one at a time, so a large model streams to disk."""
        raise NotImplementedError

    def token_ids(self, config: dict[str, Any]) -> TokenIds:
        eos = config.get("eos_token_id")
        return TokenIds(bos=config.get("bos_token_id"),
                        eos=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                        pad=config.get("pad_token_id"))


_ADAPTERS: dict[str, Adapter] = {}


def register(adapter_class: type[Adapter]) -> type[Adapter]:
    adapter = adapter_class()
    for model_type in adapter_class.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter_class


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model_type: str | None) -> Adapter:
    if model_type not in _ADAPTERS:
        raise ValueError(
            f"model_type {model_type!r} is not supported by kiln; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type]


def config_value(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first key present in the config (new and old transformers key names)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return default


def take(tensors: TensorSource, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"the checkpoint has no tensor {name!r}")
    return tensors[name]()
