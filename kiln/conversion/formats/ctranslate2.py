"""CTranslate2 model folders (model.bin + config.json + vocabulary), read in place and mapped
straight to kiln's spec and weight names; ctranslate2_bin.py reads model.bin itself."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ...model.spec import ModelSpec, TokenIds
from ...quant.int8 import IntegerWeight
from ...storage.layout import CONFIG_FILE
from .ctranslate2_bin import ModelBin

ACTIVATIONS = {0: "relu", 1: "gelu_tanh", 2: "silu", 3: "gelu"}
ROPE_SCALINGS = {0: "linear", 2: "llama3"}
SHARD = re.compile(r"model-(\d+)-of-(\d+)\.bin$")
LAYER = re.compile(r"decoder/layer_(\d+)/")


def is_ctranslate2_folder(folder: Path) -> bool:
    folder = Path(folder)
    if (folder / "model.bin").is_file() or any(folder.glob("model-*-of-*.bin")):
        return True
    config = folder / CONFIG_FILE
    vocabularies = ("vocabulary.json", "vocabulary.txt", "shared_vocabulary.json",
                    "shared_vocabulary.txt", "source_vocabulary.json", "source_vocabulary.txt")
    if not config.is_file() or not any((folder / v).is_file() for v in vocabularies):
        return False
    try:
        return "model_type" not in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def model_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if (folder / "model.bin").is_file():
        return [folder / "model.bin"]
    shards = sorted((p for p in folder.glob("model-*-of-*.bin") if SHARD.match(p.name)),
                    key=lambda p: int(SHARD.match(p.name).group(1)))
    if shards:
        total = int(SHARD.match(shards[0].name).group(2))
        if len(shards) != total:
            raise FileNotFoundError(f"{folder} has {len(shards)} of the {total} model-*.bin shards")
        return shards
    raise FileNotFoundError(f"{folder} has no model.bin (nor model-NN-of-MM.bin shards)")


class CTranslate2Checkpoint:
    """A CTranslate2 decoder folder as conversion sees a checkpoint; it maps straight to
    kiln's spec and names (no Hugging Face adapter in between)."""

    format_name = "ctranslate2"

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder)
        self.model = ModelBin(model_files(self.path))
        config_path = self.path / "config.json"
        self.config = json.loads(config_path.read_text(encoding="utf-8")) \
            if config_path.is_file() else {}
        self.vocabulary = read_vocabulary(self.path)
        if not self.model.has("decoder/embeddings/weight") or self.model.has("encoder/embeddings/weight") \
                or self.model.has("encoder/embeddings_0/weight"):
            raise ValueError(f"{self.path} holds a CTranslate2 {self.model.spec_name or 'model'}; "
                             "kiln.Generator reads decoder-only language models: load "
                             "translators with kiln.Translator and encoders with kiln.Encoder")

    # -- the checkpoint interface --------------------------------------------------------------

    def tokenizer_vocab_size(self) -> int | None:
        if (self.path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(self.path / "tokenizer.json")).get_vocab_size(True)
        return None

    def dtype(self) -> str:
        """The float type of the variables that are not integer weights."""
        dtype = self.model.variables[self.model.resolve("decoder/layer_norm/gamma")][0]
        return str(dtype).removeprefix("torch.")

    def weights(self) -> str | None:
        dtype = self.model.variables[self.model.resolve("decoder/embeddings/weight")][0]
        return {torch.int8: "int8", torch.int16: "int16"}.get(dtype)

    def has_file(self, name: str) -> bool:
        return (self.path / name).is_file()

    def write_tokenizer(self, output: Path, extra_files: list[str]) -> None:
        import shutil

        from . import hf

        for name in [*hf.TOKENIZER_FILES, *extra_files]:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, Path(output) / name)
        # The token strings CTranslate2 users pass: kept even without a tokenizer.json.
        (Path(output) / "vocabulary.json").write_text(json.dumps(self.vocabulary),
                                                     encoding="utf-8")

    # -- the model -----------------------------------------------------------------------------

    def kiln_model(self) -> tuple[ModelSpec, Iterator[tuple[str, Any]], TokenIds]:
        spec = self.spec()
        return spec, self._releasing(self._weights(spec)), self.token_ids()

    def _releasing(self, items: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Once the consumer asks for the next tensor, the previous one has been written:
        its pages of the mapped file are given back."""
        self.model.release_touched()  # what spec() read
        for item in items:
            yield item
            self.model.release_touched()

    def _flag(self, name: str, default: bool) -> bool:
        return bool(self.model.scalar(name, default))

    def _unsupported(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: {what} is not supported by kiln")

    def spec(self) -> ModelSpec:
        model = self.model
        attention = "decoder/layer_0/self_attention/"
        if not self._flag("decoder/pre_norm", True):
            raise self._unsupported("a post-norm decoder (pre_norm = false)")
        if self._flag("decoder/alibi", False):
            raise self._unsupported("ALiBi attention")
        if self._flag("decoder/scale_embeddings", True):
            raise self._unsupported("embeddings scaled by sqrt(depth) (scale_embeddings)")
        if model.has("decoder/layer_0/shared_layer_norm/gamma"):
            raise self._unsupported("a shared layer norm (GPT-J/Falcon style)")
        activation = model.scalar("decoder/activation", 0)
        if activation not in ACTIVATIONS:
            raise self._unsupported(f"activation id {activation}")
        vocab_size, hidden = model.tensor("decoder/embeddings/weight").shape
        num_heads = int(model.scalar("decoder/num_heads"))
        head_dim = int(model.scalar(f"{attention}head_dim", hidden // num_heads))
        qkv_rows = model.tensor(f"{attention}linear_0/weight").shape[0]
        num_kv_heads = (qkv_rows // head_dim - num_heads) // 2
        rms = not model.has("decoder/layer_norm/beta")
        eps = self.config.get("layer_norm_epsilon") or (1e-6 if rms else 1e-5)
        learned = model.has("decoder/position_encodings/encodings")
        rotary = model.scalar(f"{attention}rotary_dim")
        if not learned and rotary is None:
            raise self._unsupported("sinusoidal position encodings")
        if rotary is not None and self._flag(f"{attention}rotary_interleave", True):
            raise self._unsupported("interleaved rotary embeddings (GPT-J style)")
        max_positions = (model.tensor("decoder/position_encodings/encodings").shape[0] if learned
                         else int(model.scalar(f"{attention}max_position_embeddings", 0) or 2048))
        return ModelSpec(
            vocab_size=vocab_size, hidden_size=hidden,
            num_layers=len({match.group(1) for match in map(LAYER.match, model.variables)
                            if match}),
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            intermediate_size=model.tensor("decoder/layer_0/ffn/linear_1/weight").shape[1],
            max_position_embeddings=max_positions,
            norm="rmsnorm" if rms else "layernorm", norm_eps=float(eps), norm_bias=not rms,
            activation=ACTIVATIONS[activation],
            gated_mlp=model.has("decoder/layer_0/ffn/linear_0_noact/weight"),
            parallel_residual=model.has("decoder/layer_0/input_layer_norm/gamma"),
            position="learned" if learned else "rotary",
            rotary_dim=0 if learned else int(rotary or head_dim),
            rotary_base=float(model.scalar(f"{attention}rotary_base", 10000.0)),
            rope_scaling=self._rope_scaling(attention),
            sliding_window=model.scalar(f"{attention}sliding_window"),
            qkv_bias=model.has(f"{attention}linear_0/bias"),
            attn_out_bias=model.has(f"{attention}linear_1/bias"),
            mlp_bias=model.has("decoder/layer_0/ffn/linear_0/bias"),
            tie_word_embeddings=model.resolve("decoder/projection/weight")
            == model.resolve("decoder/embeddings/weight"),
            tokenizer_vocab_size=self._usable_tokenizer_size(vocab_size),
            attention_scale=model.scalar(f"{attention}queries_scale"),
        )

    def _usable_tokenizer_size(self, vocab_size: int) -> int | None:
        size = self.tokenizer_vocab_size()
        return size if size is not None and size <= vocab_size else None

    def _rope_scaling(self, attention: str) -> dict | None:
        kind = self.model.scalar(f"{attention}rotary_scaling_type")
        if kind is None:
            return None
        if kind not in ROPE_SCALINGS:
            raise self._unsupported(f"rotary scaling type {kind}")
        scaling = {"type": ROPE_SCALINGS[kind],
                   "factor": float(self.model.scalar(f"{attention}rotary_scaling_factor", 1.0))}
        for ct2_name, kiln_name in (("rotary_low_freq_factor", "low_freq_factor"),
                                    ("rotary_high_freq_factor", "high_freq_factor"),
                                    ("original_max_position_embeddings",
                                     "original_max_position_embeddings")):
            value = self.model.scalar(f"{attention}{ct2_name}")
            if value is not None:
                scaling[kiln_name] = float(value)
        return scaling

    def _linear(self, prefix: str, *parts: str) -> IntegerWeight | torch.Tensor:
        """A weight (rows of several CTranslate2 linears stacked), integer with scales as stored."""
        weights = [self.model.tensor(f"{prefix}{part}/weight") for part in parts]
        if weights[0].is_floating_point():
            return torch.cat(weights) if len(weights) > 1 else weights[0]
        scales = [self.model.tensor(f"{prefix}{part}/weight_scale").reshape(-1) for part in parts]
        if scales[0].numel() == 1:  # an old int16 file with one scale for the whole matrix
            scales = [scale.expand(weight.shape[0]) for scale, weight in zip(scales, weights,
                                                                              strict=True)]
        bits = "int8" if weights[0].dtype == torch.int8 else "int16"
        if len(parts) == 1:
            return IntegerWeight(weights[0], scales[0].float(), bits)
        return IntegerWeight(torch.cat(weights), torch.cat(scales).float(), bits)

    def _weights(self, spec: ModelSpec) -> Iterator[tuple[str, Any]]:
        model = self.model
        yield "embed.weight", self._linear("decoder/", "embeddings")
        if spec.position == "learned":
            yield "pos_embed.weight", model.tensor("decoder/position_encodings/encodings")
        norms = ({"attn_norm": "input_layer_norm", "mlp_norm": "post_attention_layer_norm"}
                 if spec.parallel_residual else
                 {"attn_norm": "self_attention/layer_norm", "mlp_norm": "ffn/layer_norm"})
        for i in range(spec.num_layers):
            source, target = f"decoder/layer_{i}/", f"layers.{i}."
            for kiln_norm, ct2_norm in norms.items():
                yield f"{target}{kiln_norm}.weight", model.tensor(f"{source}{ct2_norm}/gamma")
                if spec.norm_bias:
                    yield f"{target}{kiln_norm}.bias", model.tensor(f"{source}{ct2_norm}/beta")
            up_parts = ("linear_0", "linear_0_noact") if spec.gated_mlp else ("linear_0",)
            linears = [("attn.qkv", "self_attention/", ("linear_0",), spec.qkv_bias),
                       ("attn.out", "self_attention/", ("linear_1",), spec.attn_out_bias),
                       ("mlp.up", "ffn/", up_parts, spec.mlp_bias),
                       ("mlp.down", "ffn/", ("linear_1",), spec.mlp_bias)]
            for kiln_name, scope, parts, bias in linears:
                yield f"{target}{kiln_name}.weight", self._linear(f"{source}{scope}", *parts)
                if bias:
                    yield f"{target}{kiln_name}.bias", torch.cat(
                        [model.tensor(f"{source}{scope}{part}/bias") for part in parts])
        yield "final_norm.weight", model.tensor("decoder/layer_norm/gamma")
        if spec.norm_bias:
            yield "final_norm.bias", model.tensor("decoder/layer_norm/beta")
        if not spec.tie_word_embeddings:
            yield "lm_head.weight", self._linear("decoder/", "projection")

    def token_ids(self) -> TokenIds:
        index = {token: i for i, token in enumerate(self.vocabulary)}

        def token_id(key: str) -> int | None:
            token = self.config.get(key) or self.model.string(key) or \
                self.model.string(f"decoder/{key}")
            return index.get(token) if token is not None else None

        eos = token_id("eos_token")
        return TokenIds(bos=token_id("bos_token"), eos=[] if eos is None else [eos],
                        unk=token_id("unk_token"))


def read_vocabulary(folder: Path) -> list[str]:
    folder = Path(folder)
    if (folder / "vocabulary.json").is_file():
        return json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    if (folder / "vocabulary.txt").is_file():  # one token per line
        text = (folder / "vocabulary.txt").read_text(encoding="utf-8")
        return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
    raise FileNotFoundError(f"{folder} has no vocabulary.json or vocabulary.txt")
