"""CTranslate2 encoder folders (TransformerEncoderModelSpec: BERT-family models converted by
CTranslate2), read in place as a kiln `EncoderSpec` and its weights. Positions are stored as
0-based tables (RoBERTa's offset already removed); int8 weights carry a scale per row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ...errors import ModelFileError
from ...model.encoder import EncoderSpec
from .ctranslate2 import ACTIVATIONS, model_files
from .ctranslate2_bin import ModelBin


def is_ctranslate2_encoder(folder: Path) -> bool:
    folder = Path(folder)
    if not (folder / "model.bin").is_file() and not list(folder.glob("model-*-of-*.bin")):
        return False
    try:
        model = ModelBin(model_files(folder))
    except (FileNotFoundError, ModelFileError):
        return False
    return model.has("encoder/embeddings_0/weight") and not model.has(
        "decoder/embeddings/weight")


class CTranslate2Encoder:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        self.model = ModelBin(model_files(self.path))
        config = self.path / "config.json"
        self.config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        for name in ("vocabulary.json", "vocabulary.txt"):
            if (self.path / name).is_file():
                text = (self.path / name).read_text(encoding="utf-8")
                self.tokens = json.loads(text) if name.endswith(".json") else text.split("\n")[:-1]
                break
        else:
            raise ModelFileError(f"{self.path} has no vocabulary.json")

    def _unsupported(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} is not supported by kiln's Encoder")

    def _tensor(self, name: str) -> torch.Tensor:
        return self.model.float_tensor(name)

    def spec(self) -> EncoderSpec:
        model = self.model
        if model.scalar("encoder/pre_norm", False):
            raise self._unsupported("a pre-norm encoder")
        if model.scalar("encoder/embeddings_merge", 1) != 1:  # CTranslate2: 0 concat, 1 add
            raise self._unsupported("embeddings merged other than by addition")
        if model.has("encoder/embeddings_2/weight"):
            raise self._unsupported("more than two embedding tables")
        activation = model.scalar("encoder/activation", 0)
        if activation not in ACTIVATIONS:
            raise self._unsupported(f"activation id {activation}")
        vocab, hidden = self._tensor("encoder/embeddings_0/weight").shape
        layers = 0
        while model.has(f"encoder/layer_{layers}/ffn/linear_0/weight"):
            layers += 1
        return EncoderSpec(
            family="ctranslate2", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
            num_heads=int(model.scalar("encoder/num_heads")),
            intermediate_size=self._tensor("encoder/layer_0/ffn/linear_0/weight").shape[0],
            max_position_embeddings=self._tensor("encoder/position_encodings/encodings").shape[0],
            type_vocab_size=(self._tensor("encoder/embeddings_1/weight").shape[0]
                             if model.has("encoder/embeddings_1/weight") else 0),
            norm_eps=float(self.config.get("layer_norm_epsilon") or 1e-12),
            activation=ACTIVATIONS[activation], position_offset=0,
            pooler=model.has("pooler_dense/weight"), pad_token_id=0)

    def weights(self, spec: EncoderSpec) -> Iterator[tuple[str, torch.Tensor]]:
        t = self._tensor
        yield "word.weight", t("encoder/embeddings_0/weight")
        yield "position.weight", t("encoder/position_encodings/encodings")
        if spec.type_vocab_size:
            yield "token_type.weight", t("encoder/embeddings_1/weight")
        yield "embed_norm.weight", t("encoder/layernorm_embedding/gamma")
        yield "embed_norm.bias", t("encoder/layernorm_embedding/beta")
        for i in range(spec.num_layers):
            layer, target = f"encoder/layer_{i}/", f"layers.{i}."
            for kind in ("weight", "bias"):
                yield f"{target}qkv.{kind}", t(f"{layer}self_attention/linear_0/{kind}")
                yield f"{target}out.{kind}", t(f"{layer}self_attention/linear_1/{kind}")
                yield f"{target}up.{kind}", t(f"{layer}ffn/linear_0/{kind}")
                yield f"{target}down.{kind}", t(f"{layer}ffn/linear_1/{kind}")
            for source, name in (("self_attention", "attn_norm"), ("ffn", "mlp_norm")):
                yield f"{target}{name}.weight", t(f"{layer}{source}/layer_norm/gamma")
                yield f"{target}{name}.bias", t(f"{layer}{source}/layer_norm/beta")
        if spec.pooler:
            yield "pooler.weight", t("pooler_dense/weight")
            yield "pooler.bias", t("pooler_dense/bias")
