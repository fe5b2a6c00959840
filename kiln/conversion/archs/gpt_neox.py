"""GPT-NeoX (Pythia, and models like it)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...model.spec import ModelSpec
from .registry import Adapter, TensorSource, activation_of, register, rope_settings, take


@register
class GPTNeoXAdapter(Adapter):
    model_types = ("gpt_neox",)

    def spec_from_config(self, config: dict[str, Any],
                         tokenizer_vocab_size: int | None) -> ModelSpec:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        head_dim = hidden // heads
        fraction, base, scaling = rope_settings(config)
        if scaling is not None:
            raise ValueError(f"rope scaling {scaling} is not supported for gpt_neox")
        bias = bool(config.get("attention_bias", True))
        return ModelSpec(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=config["intermediate_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048),
            norm="layernorm",
            norm_eps=float(config.get("layer_norm_eps", 1e-5)),
            activation=activation_of(config.get("hidden_act", "gelu")),
            parallel_residual=bool(config.get("use_parallel_residual", True)),
            position="rotary",
            rotary_dim=int(head_dim * fraction),
            rotary_base=base,
            qkv_bias=bias,
            attn_out_bias=bias,
            mlp_bias=True,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            tokenizer_vocab_size=tokenizer_vocab_size,
        )

    def convert_weights(self, spec: ModelSpec,
                        tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
        prefix = "gpt_neox." if "gpt_neox.embed_in.weight" in tensors else ""
        yield "embed.weight", take(tensors, f"{prefix}embed_in.weight")
        for i in range(spec.num_layers):
            source, target = f"{prefix}layers.{i}.", f"layers.{i}."
            for hf_norm, kiln_norm in (("input_layernorm", "attn_norm"),
                                       ("post_attention_layernorm", "mlp_norm")):
                for kind in ("weight", "bias"):
                    yield f"{target}{kiln_norm}.{kind}", take(tensors, f"{source}{hf_norm}.{kind}")
            yield f"{target}attn.qkv.weight", self.unpack_qkv(
                take(tensors, f"{source}attention.query_key_value.weight"), spec)
            linears = [("attention.dense", "attn.out"), ("mlp.dense_h_to_4h", "mlp.up"),
                       ("mlp.dense_4h_to_h", "mlp.down")]
            if spec.qkv_bias:
                yield f"{target}attn.qkv.bias", self.unpack_qkv(
                    take(tensors, f"{source}attention.query_key_value.bias"), spec)
            for hf_name, kiln_name in linears:
                yield f"{target}{kiln_name}.weight", take(tensors, f"{source}{hf_name}.weight")
                if kiln_name != "attn.out" or spec.attn_out_bias:
                    yield f"{target}{kiln_name}.bias", take(tensors, f"{source}{hf_name}.bias")
        yield "final_norm.weight", take(tensors, f"{prefix}final_layer_norm.weight")
        yield "final_norm.bias", take(tensors, f"{prefix}final_layer_norm.bias")
        if not spec.tie_word_embeddings:
            head = "embed_out.weight" if "embed_out.weight" in tensors else "lm_head.weight"
            yield "lm_head.weight", take(tensors, head)

    @staticmethod
    def unpack_qkv(tensor: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
        """HF interleaves per head ([heads, 3, head_dim, ...]); kiln stores all-Q, all-K, all-V."""
        trailing = tensor.shape[1:]
        grouped = tensor.reshape(spec.num_heads, 3, spec.head_dim, *trailing)
        return grouped.transpose(0, 1).reshape(3 * spec.q_size, *trailing).contiguous()
