"""T5, mT5 and Flan-T5 (T5 v1.1): RMSNorm before each part, relative position buckets added
to the attention scores (no 1/sqrt(d) scaling), no biases, a gated-GELU MLP (v1.1) or a ReLU
one (v1.0), and a tied head scaled by d_model^-0.5."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...model.seq2seq import Seq2SeqSpec
from .registry import TensorSource, activation_of, cat_rows, take

T5_TYPES = ("t5", "mt5")


def t5_spec(config: dict[str, Any]) -> Seq2SeqSpec:
    projection = config.get("feed_forward_proj", "relu")
    gated = projection.startswith("gated-")
    activation = projection.split("-")[-1]
    if projection == "gated-gelu":
        activation = "gelu_new"  # as transformers: the tanh GELU
    tied = config.get("tie_word_embeddings", True) is not False
    scale_outputs = config.get("scale_decoder_outputs", tied)
    pad = int(config.get("pad_token_id", 0))
    return Seq2SeqSpec(
        family=config["model_type"], vocab_size=config["vocab_size"],
        hidden_size=config["d_model"], num_heads=config["num_heads"],
        encoder_layers=config["num_layers"],
        decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
        encoder_ffn=config["d_ff"], decoder_ffn=config["d_ff"],
        # relative positions: any length; the bound only caps decoding
        max_position_embeddings=int(config.get("n_positions") or 4096),
        activation=activation_of(activation), pre_norm=True, final_norms=True,
        embedding_norm=False, positions="relative", scale_embedding=False, logits_bias=False,
        norm_eps=float(config.get("layer_norm_epsilon", 1e-6)),
        decoder_start_token_id=int(config.get("decoder_start_token_id", pad)),
        pad_token_id=pad, eos_token_id=int(config.get("eos_token_id", 1)), norm="rmsnorm",
        linear_bias=False, attention_head_dim=int(config["d_kv"]), gated_mlp=gated,
        attention_scale=1.0,
        relative_buckets=int(config.get("relative_attention_num_buckets", 32)),
        relative_max_distance=int(config.get("relative_attention_max_distance", 128)),
        output_scale=config["d_model"] ** -0.5 if scale_outputs else 1.0)


def t5_weights(spec: Seq2SeqSpec, tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    embed = "shared.weight" if "shared.weight" in tensors else "encoder.embed_tokens.weight"
    yield "embed.weight", take(tensors, embed)
    yield "lm_head.weight", take(tensors, "lm_head.weight" if "lm_head.weight" in tensors
                                 else embed)
    for side in ("encoder", "decoder"):
        yield f"{side}_relative.weight", take(
            tensors, f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        yield f"{side}_norm.weight", take(tensors, f"{side}.final_layer_norm.weight")
        count = spec.encoder_layers if side == "encoder" else spec.decoder_layers
        for i in range(count):
            block, target = f"{side}.block.{i}.layer.", f"{side}_layers.{i}."
            parts = [("0.SelfAttention", "self_attn", "0.layer_norm", "self_norm")]
            if side == "decoder":
                parts.append(("1.EncDecAttention", "cross_attn", "1.layer_norm", "cross_norm"))
            for source, name, norm, norm_name in parts:
                yield f"{target}{name}.q.weight", take(tensors, f"{block}{source}.q.weight")
                yield f"{target}{name}.kv.weight", cat_rows(
                    [take(tensors, f"{block}{source}.{part}.weight") for part in ("k", "v")])
                yield f"{target}{name}.out.weight", take(tensors, f"{block}{source}.o.weight")
                yield f"{target}{norm_name}.weight", take(tensors, f"{block}{norm}.weight")
            mlp = f"{block}{2 if side == 'decoder' else 1}."
            if spec.gated_mlp:
                yield f"{target}up.weight", cat_rows(
                    [take(tensors, f"{mlp}DenseReluDense.{part}.weight")
                     for part in ("wi_0", "wi_1")])
            else:
                yield f"{target}up.weight", take(tensors, f"{mlp}DenseReluDense.wi.weight")
            yield f"{target}down.weight", take(tensors, f"{mlp}DenseReluDense.wo.weight")
            yield f"{target}mlp_norm.weight", take(tensors, f"{mlp}layer_norm.weight")
