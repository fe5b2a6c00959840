"""A GGUF file (llama.cpp's format) read as a Hugging Face Llama checkpoint.

The file is opened once with `gguf.GGUFReader`, which memory-maps it; each tensor is dequantized
to float32 only when its loader is called. Tensor names are mapped to Hugging Face Llama names,
shapes are turned back into PyTorch's `[out, in]` order, and llama.cpp's permutation of the
q/k projection rows (done for its interleaved rotary) is undone for rotate-half rotary.
The tokenizer is rebuilt from the metadata by gguf_tokenizer.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ModelFileError
from ...quant.int4 import GroupWeight
from .gguf_int4 import GROUP, NATIVE_TYPES, group_weight
from .gguf_tokenizer import GGUFTokenizer

try:
    import gguf
    from gguf import GGMLQuantizationType, GGUFReader
except ImportError as _error:  # pragma: no cover - depends on the environment
    raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf") from _error

SUPPORTED_ARCHITECTURES = ("llama",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def _dequantizable_types() -> set[GGMLQuantizationType]:
    """The tensor types this installed `gguf` can turn into float32."""
    traits = getattr(gguf.quants, "_type_traits", {})
    return {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *traits}


def _f32(value: Any) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def unpermute_index(rows: int, n_head: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation (see unpermute_rows)."""
    return unpermute_rows(torch.arange(rows).unsqueeze(1), n_head).squeeze(1)


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary -> Hugging Face rotate-half)."""
    out = weight.shape[0]
    if out % (2 * n_head):
        raise ModelFileError(f"cannot un-permute a q/k tensor of {out} rows into {n_head} heads")
    rest = weight.shape[1:]
    return (weight.reshape(n_head, out // n_head // 2, 2, *rest).transpose(1, 2)
            .reshape(weight.shape).contiguous())


class GGUFCheckpoint:
    """A GGUF file as conversion sees any checkpoint: config, tensors, tokenizer."""

    format_name = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF file at {self.path}")
        try:
            self._reader = GGUFReader(str(self.path), "r")
        except OSError:
            raise
        except Exception as error:  # the reader fails with ValueError, IndexError, ... on bad data
            raise ModelFileError(f"{self.path} is not a readable GGUF file (not GGUF, or corrupt or "
                                 f"truncated): {type(error).__name__}: {error}") from error
        self._fields = self._reader.fields
        self._gguf_tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        self.architecture = self._string("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                             f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
        self.config = self._build_config()
        self.tensors = self._build_tensors()
        self._native_group_size: int | None = None

    def keep_4bit_groups(self, group_size: int) -> None:
        """Conversion to int4 in groups of `group_size`: 4-bit blocks of that size (Q4_0,
        Q4_1, Q4_K at 32) come as kiln int4 weights, never through float."""
        self._native_group_size = group_size

    # --- metadata -----------------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """The value of one GGUF metadata key (str, number, bool or list), or `default`."""
        field = self._fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _string(self, key: str) -> str:
        value = self.metadata(key)
        if value is None:
            raise ModelFileError(f"{self.path}: the GGUF metadata lacks {key!r}")
        return value

    def _arch(self, key: str, default: Any = None, required: bool = False) -> Any:
        full = f"{self.architecture}.{key}"
        value = self.metadata(full, default)
        if value is None and required:
            raise ModelFileError(f"{self.path}: the GGUF metadata lacks {full!r}")
        if isinstance(value, list):
            raise ValueError(f"{self.path}: {full} is a per-layer list {value[:4]}...; kiln supports "
                             "only one value for all layers")
        return value

    def _build_config(self) -> dict[str, Any]:
        arch = self._arch
        if arch("expert_count", 0):
            raise ValueError(f"{self.path}: a mixture-of-experts GGUF ({self.architecture}.expert_count"
                             f" = {arch('expert_count')}) is not supported")
        if "rope_freqs.weight" in self._gguf_tensors:
            raise ValueError(f"{self.path}: the GGUF has a rope_freqs.weight tensor (Llama 3.1-style "
                             "rope frequency scaling), which kiln cannot convert yet")
        hidden = int(arch("embedding_length", required=True))
        n_head = int(arch("attention.head_count", required=True))
        n_kv = int(arch("attention.head_count_kv", n_head))
        head_dim = int(arch("attention.key_length", hidden // n_head))
        value_dim = int(arch("attention.value_length", head_dim))
        rotary = int(arch("rope.dimension_count", head_dim))
        if value_dim != head_dim or rotary != head_dim:
            raise ValueError(f"{self.path}: key length {head_dim}, value length {value_dim} and rope "
                             f"dimension {rotary} differ; a Llama model needs them equal")
        embedding = self._gguf_tensors.get("token_embd.weight")
        if embedding is None:
            raise ModelFileError(f"{self.path}: the GGUF has no token_embd.weight tensor")
        vocab = int(embedding.shape[-1])  # GGUF order: [hidden, vocab]
        tied = "output.weight" not in self._gguf_tensors
        rope_theta = _f32(arch("rope.freq_base", 10000.0))
        rope_scaling = self._rope_scaling()
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(arch("feed_forward_length", required=True)),
            "num_hidden_layers": int(arch("block_count", required=True)),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(arch("context_length", 2048)),
            "rms_norm_eps": _f32(arch("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": rope_theta,
            # transformers >= 5 reads rope settings from here; older versions from the two above
            "rope_parameters": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": tied,
            "dtype": "float32",
        }
        if rope_scaling:
            config["rope_scaling"] = rope_scaling
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                          ("pad_token_id", "padding")):
            value = self.metadata(f"tokenizer.ggml.{name}_token_id")
            if value is not None:
                config[key] = int(value)
        return config

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind = self._arch("rope.scaling.type")
        factor = self._arch("rope.scaling.factor")
        if kind is None and self._arch("rope.scale_linear") is not None:  # older files
            kind, factor = "linear", self._arch("rope.scale_linear")
        if kind in (None, "none") or (kind == "linear" and factor in (None, 0.0, 1.0)):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": _f32(factor)}
        if kind == "yarn":
            scaling: dict[str, Any] = {"rope_type": "yarn", "factor": _f32(factor)}
            original = self._arch("rope.scaling.original_context_length")
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            return scaling
        raise ValueError(f"{self.path}: rope scaling type {kind!r} is not supported; supported: "
                         "none, linear, yarn")

    # --- tensors ------------------------------------------------------------------------------

    def _build_tensors(self) -> dict[str, Callable[[], torch.Tensor]]:
        layers = self.config["num_hidden_layers"]
        tensors: dict[str, Callable[[], torch.Tensor]] = {}
        unknown = []
        for name in self._gguf_tensors:
            match = _BLOCK_NAME.fullmatch(name)
            if name in _GLOBAL_TENSORS:
                hf_name = _GLOBAL_TENSORS[name]
            elif match and match.group(2) in _BLOCK_TENSORS and int(match.group(1)) < layers:
                hf_name = f"model.layers.{int(match.group(1))}.{_BLOCK_TENSORS[match.group(2)]}"
            else:
                unknown.append(name)
                continue
            heads = None
            if name.endswith(".attn_q.weight"):
                heads = self.config["num_attention_heads"]
            elif name.endswith(".attn_k.weight"):
                heads = self.config["num_key_value_heads"]
            tensors[hf_name] = partial(self._load, name, heads)
        if unknown:
            raise ModelFileError(f"{self.path}: the GGUF has tensors kiln cannot map to a Llama model: "
                                 f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        return tensors

    def _load(self, name: str, unpermute_heads: int | None = None) -> torch.Tensor | GroupWeight:
        """Dequantize one GGUF tensor to float32 in PyTorch `[out, in]` order (or, converting
        to int4 in its block size, read its 4-bit blocks as they are)."""
        tensor = self._gguf_tensors[name]
        kind = GGMLQuantizationType(tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if self._native_group_size == GROUP and kind.name in NATIVE_TYPES and len(shape) == 2:
            try:
                weight = group_weight(tensor.data, kind.name, *shape)
            except ValueError as error:
                raise ModelFileError(f"{self.path}: tensor {name!r}: {error}") from error
            except OverflowError:
                weight = None  # scales float16 cannot hold: through float32 instead
            if weight is not None:
                if unpermute_heads is not None:
                    weight = weight.rows(unpermute_index(shape[0], unpermute_heads))
                return weight
        try:
            array = gguf.quants.dequantize(tensor.data, kind)
        except NotImplementedError as error:
            raise ValueError(f"{self.path}: tensor {name!r} has type {kind.name}, which the installed "
                             f"gguf package cannot dequantize ({error}); supported: "
                             f"{', '.join(sorted(t.name for t in _dequantizable_types()))}") from error
        array = np.asarray(array, dtype=np.float32)
        if not array.flags.writeable or np.may_share_memory(array, tensor.data):
            array = array.copy()  # F32 comes back as a view of the read-only memory map
        weight = torch.from_numpy(array).reshape(shape)
        if unpermute_heads is not None:
            weight = unpermute_rows(weight, unpermute_heads)
        return weight

    # --- the interface conversion uses ----------------------------------------------------------

    def tokenizer_vocab_size(self) -> int | None:
        field = self._fields.get("tokenizer.ggml.tokens")
        return None if field is None else len(field.data)

    def dtype(self) -> str:
        return "float32"  # every tensor is dequantized to float32

    def has_file(self, name: str) -> bool:
        return False  # a GGUF file has no side files

    def write_tokenizer(self, output: Path, extra_files: list[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `output`."""
        if extra_files:
            raise FileNotFoundError(f"{self.path} is a single GGUF file with no side files; cannot "
                                    f"copy {list(extra_files)}")
        output = Path(output)
        source = GGUFTokenizer(self.metadata, self.path)
        source.build_tokenizer().save(str(output / "tokenizer.json"))
        config, special = source.tokenizer_config(self.config["max_position_embeddings"])
        (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False)
                                                      + "\n", encoding="utf-8")
        (output / "special_tokens_map.json").write_text(json.dumps(special, indent=2,
                                                                   ensure_ascii=False) + "\n",
                                                        encoding="utf-8")

    def build_tokenizer(self):
        """The GGUF's tokenizer as a `tokenizers.Tokenizer`."""
        return GGUFTokenizer(self.metadata, self.path).build_tokenizer()
