"""Llama and its close relatives: Mistral (sliding window), Qwen2 (QKV biases), SmolLM2."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...model.spec import ModelSpec
from .registry import Adapter, TensorSource, activation_of, cat_rows, register, rope_settings, take


@register
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")

    def spec_from_config(self, config: dict[str, Any],
                         tokenizer_vocab_size: int | None) -> ModelSpec:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        fraction, base, scaling = rope_settings(config)
        is_qwen2 = config.get("model_type") == "qwen2"
        attention_bias = bool(config.get("attention_bias", False))
        return ModelSpec(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            norm="rmsnorm",
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            norm_bias=False,
            activation=activation_of(config.get("hidden_act", "silu")),
            gated_mlp=True,
            parallel_residual=False,
            position="rotary",
            rotary_dim=int(head_dim * fraction),
            rotary_base=base,
            rope_scaling=scaling,
            sliding_window=self._sliding_window(config),
            qkv_bias=is_qwen2 or attention_bias,
            attn_out_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            tokenizer_vocab_size=tokenizer_vocab_size,
        )

    @staticmethod
    def _sliding_window(config: dict[str, Any]) -> int | None:
        window = config.get("sliding_window")
        if config.get("model_type") == "qwen2" and not config.get("use_sliding_window", False):
            return None
        if window is None or window >= config.get("max_position_embeddings", 2048):
            return None  # a window as long as the context changes nothing
        return int(window)

    def convert_weights(self, spec: ModelSpec,
                        tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
        yield "embed.weight", take(tensors, "model.embed_tokens.weight")
        for i in range(spec.num_layers):
            source, target = f"model.layers.{i}.", f"layers.{i}."
            yield f"{target}attn_norm.weight", take(tensors, f"{source}input_layernorm.weight")
            yield f"{target}mlp_norm.weight", take(tensors, f"{source}post_attention_layernorm.weight")
            attention = f"{source}self_attn."
            yield f"{target}attn.qkv.weight", cat_rows(
                [take(tensors, f"{attention}{p}_proj.weight") for p in "qkv"])
            if spec.qkv_bias:
                yield f"{target}attn.qkv.bias", torch.cat(
                    [take(tensors, f"{attention}{p}_proj.bias") for p in "qkv"])
            yield f"{target}attn.out.weight", take(tensors, f"{attention}o_proj.weight")
            if spec.attn_out_bias:
                yield f"{target}attn.out.bias", take(tensors, f"{attention}o_proj.bias")
            mlp = f"{source}mlp."
            yield f"{target}mlp.up.weight", cat_rows(
                [take(tensors, f"{mlp}gate_proj.weight"), take(tensors, f"{mlp}up_proj.weight")])
            yield f"{target}mlp.down.weight", take(tensors, f"{mlp}down_proj.weight")
            if spec.mlp_bias:
                yield f"{target}mlp.up.bias", torch.cat(
                    [take(tensors, f"{mlp}gate_proj.bias"), take(tensors, f"{mlp}up_proj.bias")])
                yield f"{target}mlp.down.bias", take(tensors, f"{mlp}down_proj.bias")
        yield "final_norm.weight", take(tensors, "model.norm.weight")
        if not spec.tie_word_embeddings:
            yield "lm_head.weight", take(tensors, "lm_head.weight")
