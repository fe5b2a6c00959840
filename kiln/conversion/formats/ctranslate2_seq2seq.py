"""CTranslate2 translator folders (TransformerSpec: BART, mBART, Marian, M2M100/NLLB and
T5/mT5/Flan-T5 converted by CTranslate2), read in place as a kiln `Seq2SeqSpec` and its
weights.

CTranslate2 keeps positions as 0-based tables (the Hugging Face offsets already removed),
fuses q/k/v of self-attention and k/v of cross-attention as kiln does, stores the token
strings in shared_vocabulary.json (or source_/target_vocabulary.json), and may hold int8
weights with a scale per row, kiln's own convention.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ...errors import ModelFileError
from ...model.seq2seq import Seq2SeqSpec
from .ctranslate2 import ACTIVATIONS, model_files
from .ctranslate2_bin import ModelBin


def is_ctranslate2_translator(folder: Path) -> bool:
    folder = Path(folder)
    if not (folder / "model.bin").is_file() and not list(folder.glob("model-*-of-*.bin")):
        return False
    return any((folder / name).is_file() for name in
               ("shared_vocabulary.json", "shared_vocabulary.txt", "source_vocabulary.json",
                "source_vocabulary.txt"))


def _read_tokens(folder: Path, stem: str) -> list[str] | None:
    if (folder / f"{stem}.json").is_file():
        return json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    if (folder / f"{stem}.txt").is_file():
        return (folder / f"{stem}.txt").read_text(encoding="utf-8").split("\n")[:-1]
    return None


class CTranslate2Translator:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        self.model = ModelBin(model_files(self.path))
        if not self.model.has("encoder/layer_0/self_attention/linear_0/weight") or not \
                self.model.has("decoder/layer_0/attention/linear_0/weight"):
            raise ValueError(f"{self.path} is not a CTranslate2 translator (TransformerSpec)")
        config = self.path / "config.json"
        self.config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        shared = _read_tokens(self.path, "shared_vocabulary")
        self.source_tokens = shared or _read_tokens(self.path, "source_vocabulary")
        self.target_tokens = shared or _read_tokens(self.path, "target_vocabulary")
        if self.source_tokens is None or self.target_tokens is None:
            raise ModelFileError(f"{self.path} has no vocabulary files")

    def _flag(self, name: str, default: bool) -> bool:
        return bool(self.model.scalar(name, default))

    def _unsupported(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} is not supported by kiln's Translator")

    def _layers(self, side: str) -> int:
        count = 0
        while self.model.has(f"{side}/layer_{count}/ffn/linear_0/weight"):
            count += 1
        return count

    def spec(self) -> Seq2SeqSpec:
        model = self.model
        if model.has("encoder/layer_0/self_attention/relative_position_keys"):
            raise self._unsupported("Shaw-style relative positions")
        if model.has("encoder/embeddings_1/weight"):
            raise self._unsupported("several source features")
        shared = self._shared()
        if model.has("encoder/layer_0/self_attention/relative_attention_bias"):
            return self._t5_spec(shared)
        hidden = shared["hidden_size"]
        pre_norm = self._flag("decoder/pre_norm", True)
        if self._flag("encoder/pre_norm", True) != pre_norm:
            raise self._unsupported("pre-norm on one side only")
        scale = float(model.scalar("decoder/scale_embeddings", 1.0))
        if not (math.isclose(scale, 1.0) or math.isclose(scale, math.sqrt(hidden))
                or scale == 0):  # old files: 1 meant True
            raise self._unsupported(f"embeddings scaled by {scale}")
        if not model.has("encoder/position_encodings/encodings"):
            raise self._unsupported("a model without position encodings")
        table = self._tensor("decoder/position_encodings/encodings")
        return Seq2SeqSpec(
            **shared, family="ctranslate2",
            encoder_ffn=self._tensor("encoder/layer_0/ffn/linear_0/weight").shape[0],
            decoder_ffn=self._tensor("decoder/layer_0/ffn/linear_0/weight").shape[0],
            max_position_embeddings=table.shape[0],
            pre_norm=pre_norm, final_norms=model.has("decoder/layer_norm/gamma"),
            embedding_norm=model.has("decoder/layernorm_embedding/gamma"),
            positions="learned", position_offset=0,
            scale_embedding=not math.isclose(scale, 1.0) and scale != 0,
            norm_eps=float(self.config.get("layer_norm_epsilon") or 1e-5), pad_token_id=0,
            zero_start=self._flag("decoder/start_from_zero_embedding", False))

    def _shared(self) -> dict:
        """The spec fields read the same way for every translator CTranslate2 writes."""
        model = self.model
        vocab, hidden = self._tensor("decoder/embeddings/weight").shape
        heads = int(model.scalar("decoder/num_heads"))
        if int(model.scalar("encoder/num_heads", heads)) != heads:
            raise self._unsupported("different head counts in encoder and decoder")
        activation = model.scalar("decoder/activation", 0)
        if activation not in ACTIVATIONS:
            raise self._unsupported(f"activation id {activation}")
        eos = self.config.get("eos_token", "</s>")
        start = self.config.get("decoder_start_token", eos)
        target = {token: index for index, token in enumerate(self.target_tokens)}
        if eos not in target or start not in target:
            raise ModelFileError(f"{self.path}: the end or start token ({eos!r}, {start!r}) "
                                 "is not in the target vocabulary")
        return dict(vocab_size=vocab, hidden_size=hidden, num_heads=heads,
                    encoder_layers=self._layers("encoder"),
                    decoder_layers=self._layers("decoder"), activation=ACTIVATIONS[activation],
                    logits_bias=model.has("decoder/projection/bias"),
                    decoder_start_token_id=target[start], eos_token_id=target[eos],
                    alignment_layer=int(model.scalar("decoder/alignment_layer", -1)),
                    alignment_heads=int(model.scalar("decoder/alignment_heads", 1)))

    def _t5_spec(self, shared: dict) -> Seq2SeqSpec:
        """T5 / mT5 / Flan-T5 as CTranslate2 writes them: RMSNorm (gamma only), relative
        position buckets shared by the layers of each side, no biases, unscaled attention,
        the decoder output scaled before the head."""
        model = self.model
        inner = self._tensor("encoder/layer_0/self_attention/linear_0/weight").shape[0] // 3
        return Seq2SeqSpec(
            **shared, family="ctranslate2-t5",
            encoder_ffn=self._tensor("encoder/layer_0/ffn/linear_1/weight").shape[1],
            decoder_ffn=self._tensor("decoder/layer_0/ffn/linear_1/weight").shape[1],
            max_position_embeddings=4096, pre_norm=True, final_norms=True,
            embedding_norm=False, positions="relative", scale_embedding=False,
            norm_eps=float(self.config.get("layer_norm_epsilon") or 1e-6),
            pad_token_id=shared["decoder_start_token_id"], norm="rmsnorm", linear_bias=False,
            attention_head_dim=inner // shared["num_heads"],
            gated_mlp=model.has("decoder/layer_0/ffn/linear_0_noact/weight"),
            attention_scale=float(model.scalar("decoder/layer_0/self_attention/queries_scale",
                                               1.0)),
            relative_buckets=self._tensor(
                "decoder/layer_0/self_attention/relative_attention_bias").shape[0],
            relative_max_distance=int(model.scalar(
                "decoder/layer_0/self_attention/relative_attention_max_distance", 128)),
            output_scale=float(model.scalar("decoder/scale_outputs", 1.0)))

    def _tensor(self, name: str) -> torch.Tensor:
        return self.model.float_tensor(name)

    def weights(self, spec: Seq2SeqSpec) -> Iterator[tuple[str, torch.Tensor]]:
        if spec.positions == "relative":
            yield from self._t5_weights(spec)
            return
        t = self._tensor
        yield "embed.weight", t("decoder/embeddings/weight")
        source_embed = t("encoder/embeddings_0/weight")
        if source_embed.shape != (spec.vocab_size, spec.hidden_size) or not torch.equal(
                source_embed, t("decoder/embeddings/weight")):
            raise self._unsupported("separate source and target embeddings")
        yield "lm_head.weight", t("decoder/projection/weight")
        if spec.logits_bias:
            yield "logits_bias", t("decoder/projection/bias")
        for side in ("encoder", "decoder"):
            yield f"{side}_positions.weight", t(f"{side}/position_encodings/encodings")
            if spec.embedding_norm:
                yield from self._norm(f"{side}/layernorm_embedding", f"{side}_embed_norm")
            if spec.final_norms:
                yield from self._norm(f"{side}/layer_norm", f"{side}_norm")
            count = spec.encoder_layers if side == "encoder" else spec.decoder_layers
            for i in range(count):
                layer, target = f"{side}/layer_{i}/", f"{side}_layers.{i}."
                qkv = layer + "self_attention/"
                for kind in ("weight", "bias"):
                    fused = t(f"{qkv}linear_0/{kind}")
                    q, kv = fused[:spec.hidden_size], fused[spec.hidden_size:]
                    yield f"{target}self_attn.q.{kind}", q
                    yield f"{target}self_attn.kv.{kind}", kv
                    yield f"{target}self_attn.out.{kind}", t(f"{qkv}linear_1/{kind}")
                    if side == "decoder":
                        cross = layer + "attention/"
                        yield f"{target}cross_attn.q.{kind}", t(f"{cross}linear_0/{kind}")
                        yield f"{target}cross_attn.kv.{kind}", t(f"{cross}linear_1/{kind}")
                        yield f"{target}cross_attn.out.{kind}", t(f"{cross}linear_2/{kind}")
                    yield f"{target}up.{kind}", t(f"{layer}ffn/linear_0/{kind}")
                    yield f"{target}down.{kind}", t(f"{layer}ffn/linear_1/{kind}")
                yield from self._norm(f"{qkv}layer_norm", f"{target}self_norm")
                if side == "decoder":
                    yield from self._norm(f"{layer}attention/layer_norm", f"{target}cross_norm")
                yield from self._norm(f"{layer}ffn/layer_norm", f"{target}mlp_norm")

    def _t5_weights(self, spec: Seq2SeqSpec) -> Iterator[tuple[str, torch.Tensor]]:
        t = self._tensor
        yield "embed.weight", t("decoder/embeddings/weight")
        yield "lm_head.weight", t("decoder/projection/weight")
        if spec.logits_bias:
            yield "logits_bias", t("decoder/projection/bias")
        inner = spec.inner_size
        for side in ("encoder", "decoder"):
            yield (f"{side}_relative.weight",
                   t(f"{side}/layer_0/self_attention/relative_attention_bias"))
            yield f"{side}_norm.weight", t(f"{side}/layer_norm/gamma")
            count = spec.encoder_layers if side == "encoder" else spec.decoder_layers
            for i in range(count):
                layer, target = f"{side}/layer_{i}/", f"{side}_layers.{i}."
                fused = t(f"{layer}self_attention/linear_0/weight")
                yield f"{target}self_attn.q.weight", fused[:inner]
                yield f"{target}self_attn.kv.weight", fused[inner:]
                yield f"{target}self_attn.out.weight", t(f"{layer}self_attention/linear_1/weight")
                yield f"{target}self_norm.weight", t(f"{layer}self_attention/layer_norm/gamma")
                if side == "decoder":
                    cross = layer + "attention/"
                    yield f"{target}cross_attn.q.weight", t(f"{cross}linear_0/weight")
                    yield f"{target}cross_attn.kv.weight", t(f"{cross}linear_1/weight")
                    yield f"{target}cross_attn.out.weight", t(f"{cross}linear_2/weight")
                    yield f"{target}cross_norm.weight", t(f"{cross}layer_norm/gamma")
                up = t(f"{layer}ffn/linear_0/weight")
                if spec.gated_mlp:  # linear_0 is activated, linear_0_noact multiplies it
                    up = torch.cat([up, t(f"{layer}ffn/linear_0_noact/weight")])
                yield f"{target}up.weight", up
                yield f"{target}down.weight", t(f"{layer}ffn/linear_1/weight")
                yield f"{target}mlp_norm.weight", t(f"{layer}ffn/layer_norm/gamma")

    def _norm(self, source: str, target: str) -> Iterator[tuple[str, torch.Tensor]]:
        yield f"{target}.weight", self._tensor(f"{source}/gamma")
        yield f"{target}.bias", self._tensor(f"{source}/beta")
