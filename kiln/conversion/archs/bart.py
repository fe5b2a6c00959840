"""The BART family of translation models: BART, mBART, Marian (OPUS-MT) and M2M100 / NLLB
(and the entry point for T5, in t5.py). Each maps its Hugging Face config to a `Seq2SeqSpec`
and its weights to kiln's names (k and v stacked into one projection)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...errors import ModelFileError
from ...model.seq2seq import Seq2SeqSpec
from .registry import TensorSource, activation_of, cat_rows, take
from .t5 import T5_TYPES, t5_spec, t5_weights

SUPPORTED = ("bart", "mbart", "marian", "m2m_100", *T5_TYPES)


def is_seq2seq_type(model_type: str | None) -> bool:
    return model_type in SUPPORTED


def seq2seq_spec(config: dict[str, Any]) -> Seq2SeqSpec:
    family = config.get("model_type")
    if family in T5_TYPES:
        return t5_spec(config)
    if family not in SUPPORTED:
        raise ValueError(f"model_type {family!r} is not a supported translation model; "
                         f"supported: {', '.join(SUPPORTED)}")
    if config.get("d_model", 0) % config.get("encoder_attention_heads", 1):
        raise ValueError("d_model must be a multiple of the attention heads")
    if config.get("encoder_attention_heads") != config.get("decoder_attention_heads"):
        raise ValueError("encoder and decoder attention heads differ: not supported")
    pad = int(config.get("pad_token_id", 1))
    positions, offset = {"bart": ("learned", 2), "mbart": ("learned", 2),
                         "marian": ("sinusoidal_interleaved", 0),
                         "m2m_100": ("sinusoidal", pad + 1)}[family]
    pre_norm = family in ("mbart", "m2m_100") or bool(config.get("normalize_before"))
    eos = config.get("eos_token_id", 2)
    return Seq2SeqSpec(
        family=family, vocab_size=config["vocab_size"], hidden_size=config["d_model"],
        num_heads=config["encoder_attention_heads"],
        encoder_layers=config["encoder_layers"], decoder_layers=config["decoder_layers"],
        encoder_ffn=config["encoder_ffn_dim"], decoder_ffn=config["decoder_ffn_dim"],
        max_position_embeddings=config["max_position_embeddings"],
        activation=activation_of(config.get("activation_function", "gelu")),
        pre_norm=pre_norm, final_norms=family in ("mbart", "m2m_100"),
        embedding_norm=family in ("bart", "mbart"), positions=positions, position_offset=offset,
        scale_embedding=bool(config.get("scale_embedding", False)),
        logits_bias=family in ("bart", "mbart", "marian"),
        decoder_start_token_id=int(config.get("decoder_start_token_id", eos)),
        pad_token_id=pad, eos_token_id=int(eos if isinstance(eos, int) else eos[0]))


def _first(tensors: TensorSource, *names: str) -> str:
    for name in names:
        if name in tensors:
            return name
    raise ModelFileError(f"the checkpoint has none of the tensors {list(names)}")


def seq2seq_weights(spec: Seq2SeqSpec,
                    tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    if spec.family in T5_TYPES:
        yield from t5_weights(spec, tensors)
        return
    prefix = "model." if any(name.startswith("model.") for name in tensors) else ""
    embed = _first(tensors, f"{prefix}shared.weight", f"{prefix}encoder.embed_tokens.weight",
                   f"{prefix}decoder.embed_tokens.weight")
    yield "embed.weight", take(tensors, embed)
    head = "lm_head.weight" if "lm_head.weight" in tensors else embed
    yield "lm_head.weight", take(tensors, head)
    if spec.logits_bias:
        bias = (take(tensors, "final_logits_bias") if "final_logits_bias" in tensors
                else torch.zeros(1, spec.vocab_size))
        yield "logits_bias", bias.reshape(-1)
    for side in ("encoder", "decoder"):
        source = f"{prefix}{side}."
        if spec.positions == "learned":
            yield f"{side}_positions.weight", take(tensors, f"{source}embed_positions.weight")
        elif f"{source}embed_positions.weight" in tensors:  # a stored table wins (Marian)
            yield f"{side}_table", take(tensors, f"{source}embed_positions.weight")
        if spec.embedding_norm:
            yield from _norm(tensors, f"{source}layernorm_embedding", f"{side}_embed_norm")
        if spec.final_norms:
            yield from _norm(tensors, f"{source}layer_norm", f"{side}_norm")
        count = spec.encoder_layers if side == "encoder" else spec.decoder_layers
        for i in range(count):
            layer, target = f"{source}layers.{i}.", f"{side}_layers.{i}."
            attentions = [("self_attn", "self_attn", "self_attn_layer_norm", "self_norm")]
            if side == "decoder":
                attentions.append(("encoder_attn", "cross_attn", "encoder_attn_layer_norm",
                                   "cross_norm"))
            for hf_name, name, hf_norm, norm in attentions:
                for kind in ("weight", "bias"):
                    yield f"{target}{name}.q.{kind}", take(tensors,
                                                           f"{layer}{hf_name}.q_proj.{kind}")
                    yield f"{target}{name}.kv.{kind}", cat_rows(
                        [take(tensors, f"{layer}{hf_name}.{part}_proj.{kind}")
                         for part in ("k", "v")])
                    yield f"{target}{name}.out.{kind}", take(tensors,
                                                             f"{layer}{hf_name}.out_proj.{kind}")
                yield from _norm(tensors, f"{layer}{hf_norm}", f"{target}{norm}")
            for kind in ("weight", "bias"):
                yield f"{target}up.{kind}", take(tensors, f"{layer}fc1.{kind}")
                yield f"{target}down.{kind}", take(tensors, f"{layer}fc2.{kind}")
            yield from _norm(tensors, f"{layer}final_layer_norm", f"{target}mlp_norm")


def _norm(tensors: TensorSource, source: str, target: str) -> Iterator[tuple[str, torch.Tensor]]:
    for kind in ("weight", "bias"):
        yield f"{target}.{kind}", take(tensors, f"{source}.{kind}")
