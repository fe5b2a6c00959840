"""BERT-family encoders: BERT (and MiniLM-style BERTs), RoBERTa, XLM-R, CamemBERT, DistilBERT.
Each maps its Hugging Face config to an `EncoderSpec` and its weights to the encoder's names
(q, k and v stacked into one qkv projection)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ...errors import ModelFileError
from ...model.encoder import EncoderSpec
from .registry import TensorSource, activation_of, cat_rows, take

ROBERTA_TYPES = ("roberta", "xlm-roberta", "camembert")
ENCODER_TYPES = ("bert", *ROBERTA_TYPES, "distilbert")


def is_encoder_type(model_type: str | None) -> bool:
    return model_type in ENCODER_TYPES


def encoder_spec(config: dict[str, Any]) -> EncoderSpec:
    model_type = config.get("model_type")
    if model_type not in ENCODER_TYPES:
        raise ValueError(f"model_type {model_type!r} is not a supported encoder; supported: "
                         f"{', '.join(ENCODER_TYPES)}")
    pad = int(config.get("pad_token_id") or 0)
    if model_type == "distilbert":
        if config.get("sinusoidal_pos_embds"):
            raise ValueError("DistilBERT with sinusoidal position embeddings is not supported")
        return EncoderSpec(
            family=model_type, vocab_size=config["vocab_size"], hidden_size=config["dim"],
            num_layers=config["n_layers"], num_heads=config["n_heads"],
            intermediate_size=config["hidden_dim"],
            max_position_embeddings=config["max_position_embeddings"], type_vocab_size=0,
            norm_eps=1e-12, activation=activation_of(config.get("activation", "gelu")),
            position_offset=0, pooler=False, pad_token_id=pad)
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {config['position_embedding_type']!r} is not "
                         "supported; kiln's encoders use absolute positions")
    return EncoderSpec(
        family=model_type, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position_embeddings=config["max_position_embeddings"],
        type_vocab_size=int(config.get("type_vocab_size") or 0),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        activation=activation_of(config.get("hidden_act", "gelu")),
        position_offset=pad + 1 if model_type in ROBERTA_TYPES else 0,
        pooler=True, pad_token_id=pad)


def _prefix(tensors: TensorSource, names: tuple[str, ...], probe: str) -> str:
    for name in names:
        if f"{name}{probe}" in tensors:
            return name
    raise ModelFileError(f"the checkpoint has no tensor ending in {probe!r}; is it a "
                         "BERT-family encoder?")


def encoder_weights(spec: EncoderSpec,
                    tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(kiln name, tensor), one at a time."""
    if spec.family == "distilbert":
        yield from _distilbert_weights(spec, tensors)
        return
    prefix = _prefix(tensors, (f"{spec.family.replace('-', '_')}.", "bert.", "roberta.", ""),
                     "embeddings.word_embeddings.weight")
    embeddings = f"{prefix}embeddings."
    yield "word.weight", take(tensors, f"{embeddings}word_embeddings.weight")
    yield "position.weight", take(tensors, f"{embeddings}position_embeddings.weight")
    if spec.type_vocab_size:
        yield "token_type.weight", take(tensors, f"{embeddings}token_type_embeddings.weight")
    yield from _norm(tensors, f"{embeddings}LayerNorm", "embed_norm")
    for i in range(spec.num_layers):
        source, target = f"{prefix}encoder.layer.{i}.", f"layers.{i}."
        attention = f"{source}attention.self."
        for kind in ("weight", "bias"):
            yield f"{target}qkv.{kind}", cat_rows([take(tensors, f"{attention}{part}.{kind}")
                                                   for part in ("query", "key", "value")])
            yield f"{target}out.{kind}", take(tensors, f"{source}attention.output.dense.{kind}")
            yield f"{target}up.{kind}", take(tensors, f"{source}intermediate.dense.{kind}")
            yield f"{target}down.{kind}", take(tensors, f"{source}output.dense.{kind}")
        yield from _norm(tensors, f"{source}attention.output.LayerNorm", f"{target}attn_norm")
        yield from _norm(tensors, f"{source}output.LayerNorm", f"{target}mlp_norm")
    if spec.pooler:
        if f"{prefix}pooler.dense.weight" not in tensors:
            raise ModelFileError("the checkpoint has no pooler (pooler.dense.weight); it cannot "
                                 "give pooler_output")
        yield "pooler.weight", take(tensors, f"{prefix}pooler.dense.weight")
        yield "pooler.bias", take(tensors, f"{prefix}pooler.dense.bias")


def _distilbert_weights(spec: EncoderSpec,
                        tensors: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    prefix = _prefix(tensors, ("distilbert.", ""), "embeddings.word_embeddings.weight")
    yield "word.weight", take(tensors, f"{prefix}embeddings.word_embeddings.weight")
    yield "position.weight", take(tensors, f"{prefix}embeddings.position_embeddings.weight")
    yield from _norm(tensors, f"{prefix}embeddings.LayerNorm", "embed_norm")
    for i in range(spec.num_layers):
        source, target = f"{prefix}transformer.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            yield f"{target}qkv.{kind}", cat_rows([take(tensors, f"{source}attention.{part}.{kind}")
                                                   for part in ("q_lin", "k_lin", "v_lin")])
            yield f"{target}out.{kind}", take(tensors, f"{source}attention.out_lin.{kind}")
            yield f"{target}up.{kind}", take(tensors, f"{source}ffn.lin1.{kind}")
            yield f"{target}down.{kind}", take(tensors, f"{source}ffn.lin2.{kind}")
        yield from _norm(tensors, f"{source}sa_layer_norm", f"{target}attn_norm")
        yield from _norm(tensors, f"{source}output_layer_norm", f"{target}mlp_norm")


def _norm(tensors: TensorSource, source: str, target: str) -> Iterator[tuple[str, torch.Tensor]]:
    # Old BERT checkpoints name LayerNorm parameters gamma/beta.
    for kind, old in (("weight", "gamma"), ("bias", "beta")):
        name = f"{source}.{kind}" if f"{source}.{kind}" in tensors else f"{source}.{old}"
        yield f"{target}.{kind}", take(tensors, name)
