"""model_type -> Adapter. An unsupported type fails listing the supported ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ...errors import ModelFileError
from ...model.spec import ModelSpec, TokenIds

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


def cat_rows(parts: list) -> torch.Tensor:
    """Weights stacked by rows (q, k, v; gate, up). 4-bit weights in the same groups stay
    4-bit; any other mix is dequantized to float first."""
    from ...quant.int4 import GroupWeight

    if all(isinstance(part, GroupWeight) for part in parts):
        try:
            return GroupWeight.cat(parts)
        except ValueError:
            pass
    return torch.cat([part if isinstance(part, torch.Tensor) else part.dequantize()
                      for part in parts])


def take(tensors: TensorSource, name: str) -> torch.Tensor:
    if name not in tensors:
        raise ModelFileError(f"the checkpoint has no tensor {name!r}")
    return tensors[name]()


# HF hidden_act / activation_function -> kiln activation. Exact GELU is not the tanh one.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
ROPE_SCALINGS = ("linear", "llama3")


def activation_of(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def rope_settings(config: dict[str, Any]) -> tuple[float, float, dict[str, Any] | None]:
    """(rotary fraction of each head, rotary base, scaling or None), from the old and the new
    transformers key names (`rotary_pct`/`rotary_emb_base`/`rope_theta`/`rope_parameters`)."""
    parameters = config.get("rope_parameters") or {}
    scaling = dict(config.get("rope_scaling") or {})
    fraction = config_value(parameters, "partial_rotary_factor",
                            default=config_value(config, "partial_rotary_factor", "rotary_pct",
                                                 default=1.0))
    base = config_value(parameters, "rope_theta",
                        default=config_value(config, "rope_theta", "rotary_emb_base",
                                             default=10000.0))
    rope_type = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type in (None, "default"):
        return float(fraction), float(base), None
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: "
                         f"'default', {', '.join(repr(t) for t in ROPE_SCALINGS)}")
    settings = {**scaling, **parameters}
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(fraction), float(base), {"type": rope_type, **{
        key: float(settings[key]) for key in keep if settings.get(key) is not None}}
