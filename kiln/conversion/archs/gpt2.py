"""GPT-2: learned positions, Conv1D weights stored [in, out], tanh GELU, tied head."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...model.spec import ModelSpec
from .registry import Adapter, TensorSource, activation_of, register, take


@register
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)

    def spec_from_config(self, config: dict[str, Any],
                         tokenizer_vocab_size: int | None) -> ModelSpec:
        if config.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("gpt2 with scale_attn_by_inverse_layer_idx=True is not supported")
        hidden = config["n_embd"]
        heads = config["n_head"]
        head_dim = hidden // heads
        return ModelSpec(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            num_layers=config["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=config.get("n_inner") or 4 * hidden,
            max_position_embeddings=config["n_positions"],
            norm="layernorm",
            norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
            activation=activation_of(config.get("activation_function", "gelu_new")),
            position="learned",
            qkv_bias=True,
            attn_out_bias=True,
            mlp_bias=True,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            tokenizer_vocab_size=tokenizer_vocab_size,
            attention_scale=None if config.get("scale_attn_weights", True) else 1.0,
        )

    def convert_weights(self, spec: ModelSpec,
                        tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = "transformer." if "transformer.wte.weight" in tensors else ""
        yield "embed.weight", take(tensors, f"{prefix}wte.weight")
        yield "pos_embed.weight", take(tensors, f"{prefix}wpe.weight")
        for i in range(spec.num_layers):
            source, target = f"{prefix}h.{i}.", f"layers.{i}."
            for hf_norm, kiln_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                for kind in ("weight", "bias"):
                    yield f"{target}{kiln_norm}.{kind}", take(tensors, f"{source}{hf_norm}.{kind}")
            for hf_name, kiln_name in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out"),
                                       ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
                # Conv1D keeps weights as [in, out]; kiln's linears are [out, in].
                yield f"{target}{kiln_name}.weight", take(tensors, f"{source}{hf_name}.weight").t()
                yield f"{target}{kiln_name}.bias", take(tensors, f"{source}{hf_name}.bias")
        yield "final_norm.weight", take(tensors, f"{prefix}ln_f.weight")
        yield "final_norm.bias", take(tensors, f"{prefix}ln_f.bias")
        if not spec.tie_word_embeddings:
            yield "lm_head.weight", take(tensors, "lm_head.weight")
