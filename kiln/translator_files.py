"""Where a Translator's model comes from: a kiln translator folder, a CTranslate2
translator folder or a Hugging Face checkpoint; and `kiln convert` of them."""

from __future__ import annotations

from pathlib import Path

import torch

from . import seq_folder
from .conversion.archs.bart import is_seq2seq_type, seq2seq_spec, seq2seq_weights
from .conversion.formats.ctranslate2_seq2seq import (
    CTranslate2Translator,
    is_ctranslate2_translator,
)
from .conversion.formats.hf import read_config, tensor_source
from .model.seq2seq import Seq2Seq, Seq2SeqSpec
from .quant.compute_types import ComputeType
from .seq_folder import kiln_kind
from .translation_search import Vocabulary


def open_translator(folder: Path):
    """(spec, saved compute type, (kiln name, tensor) pairs, target tokens, source tokens) of
    a kiln translator folder, a CTranslate2 translator folder or a Hugging Face checkpoint
    (whose tokens come from its tokenizer: None)."""
    kind = kiln_kind(folder)
    if kind == "translator":
        return seq_folder.open_stored(folder, Seq2SeqSpec, "target_vocabulary",
                                      "source_vocabulary")
    if kind is not None:
        raise ValueError(f"{folder} holds a kiln {kind}; load it with kiln.Encoder")
    if is_ctranslate2_translator(folder):
        checkpoint = CTranslate2Translator(folder)
        spec = checkpoint.spec()
        saved = "float16" if checkpoint.model.tensor(
            "decoder/layer_0/ffn/layer_norm/gamma").dtype == torch.float16 else "float32"
        return (spec, ComputeType(None, saved), checkpoint.weights(spec),
                checkpoint.target_tokens, checkpoint.source_tokens)
    config = read_config(folder)
    if not is_seq2seq_type(config.get("model_type")):
        raise ValueError(f"{folder} is a {config.get('model_type')!r} model, not a supported "
                         "translation model (bart, mbart, marian, m2m_100, t5, mt5); load "
                         "decoders with kiln.Generator, encoders with kiln.Encoder")
    spec = seq2seq_spec(config)
    return (spec, seq_folder.checkpoint_compute(config),
            seq2seq_weights(spec, tensor_source(folder)), None, None)


def convert_translator(source: Path, output: Path, quantization: str | None = None,
                       force: bool = False, origin: dict | None = None) -> Path:
    """A kiln translator folder from a Hugging Face checkpoint or a CTranslate2 folder."""
    spec, saved, pairs, target, source_tokens = open_translator(Path(source))
    compute = ComputeType.parse(quantization or saved.name, saved.dtype)
    if compute.weights == "int4":
        raise ValueError("int4 is not offered for translation models yet; use int8")
    if target is None:
        vocabulary = Vocabulary(Path(source))
        target = [vocabulary.tokens.get(index, "") for index in range(spec.vocab_size)]
    tokens = {"target_vocabulary": target, "source_vocabulary": source_tokens or target}
    return seq_folder.write(output, "translator", Seq2Seq, spec, pairs, compute, Path(source),
                            tokens, force, origin)


def unknown_token(folder: Path) -> str:
    """The target vocabulary's unknown token, as CTranslate2 names it: its config.json's
    unk_token (CTranslate2 folders), the tokenizer's, else "<unk>"."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            token = json.loads(path.read_text(encoding="utf-8")).get("unk_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if isinstance(token, dict):  # transformers' AddedToken form
            token = token.get("content")
        if isinstance(token, str) and token:
            return token
    return "<unk>"
