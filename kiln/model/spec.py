"""The arch-neutral description of a decoder, and the kiln folder's config.json.

Every supported family (GPT-NeoX, Llama, GPT-2, ...) is described by one `ModelSpec`
holding exactly the choices in which decoder-only transformers differ. The one decoder in
`kiln.model.decoder` is built from it; adapters in `kiln.conversion.archs` produce it from a
foreign config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from ..quant.compute_types import GROUP_SIZES
from ..storage.layout import CONFIG_FILE, WEIGHTS_FILE  # noqa: F401  (re-exported)

FORMAT_NAME = "kiln"
FORMAT_VERSION = 2  # 2: int4 weights (4-bit groups); folders without them are written as 1

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
POSITIONS = ("rotary", "learned")
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INTEGER_WEIGHTS = (None, "int8", "int16", "int4")


@dataclass(frozen=True)
class ModelSpec:
    """Numerics of a decoder-only transformer. Every field changes the computed function."""

    vocab_size: int  # rows of the embedding / logits (may exceed the tokenizer's size)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    gated_mlp: bool = False  # gate and up projections fused in one matmul: act(gate) * up
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x))
    position: str = "rotary"
    rotary_dim: int = 0  # leading dims of each head that are rotated (rotate-half style)
    rotary_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear" | "llama3", "factor": ...}
    sliding_window: int | None = None  # a query sees only this many latest keys (Mistral)
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm has a bias; RMSNorm never does
    tie_word_embeddings: bool = False
    tokenizer_vocab_size: int | None = None  # logits at ids >= this are masked when sampling
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"invalid ModelSpec: {message}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}")
        require(self.norm in NORMS, f"norm {self.norm!r} is not one of {NORMS}")
        require(self.activation in ACTIVATIONS,
                f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        require(self.position in POSITIONS, f"position {self.position!r} is not one of {POSITIONS}")
        require(self.num_heads % self.num_kv_heads == 0,
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.position == "rotary":
            require(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
                    f"rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                    f"got {self.rotary_dim}")
        if self.rope_scaling is not None:
            require(self.rope_scaling.get("type") in ("linear", "llama3")
                    and self.rope_scaling.get("factor", 0) > 0,
                    f"rope_scaling {self.rope_scaling} must have type 'linear' or 'llama3' "
                    "and a factor > 0")
        if self.sliding_window is not None:
            require(self.sliding_window > 0, f"sliding_window must be > 0, got {self.sliding_window}")
        require(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        if self.tokenizer_vocab_size is not None:
            require(0 < self.tokenizer_vocab_size <= self.vocab_size,
                    f"tokenizer_vocab_size ({self.tokenizer_vocab_size}) must be in "
                    f"(0, vocab_size={self.vocab_size}]")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def usable_vocab_size(self) -> int:
        """Ids a tokenizer can produce; ids above are padding rows that must never be sampled."""
        return self.tokenizer_vocab_size or self.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"the model spec has fields this kiln does not know: {unknown}; "
                "it was written by a newer kiln, upgrade kiln to load it"
            )
        return cls(**data)


@dataclass
class TokenIds:
    """Special token ids; eos may be several ids (any of them ends generation)."""

    bos: int | None = None
    eos: list[int] = field(default_factory=list)
    pad: int | None = None
    unk: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenIds:
        eos = data.get("eos") or []
        return cls(bos=data.get("bos"), eos=[eos] if isinstance(eos, int) else list(eos),
                   pad=data.get("pad"), unk=data.get("unk"))


@dataclass
class KilnConfig:
    """Everything in a kiln folder's config.json."""

    spec: ModelSpec
    dtype: str  # storage type of the float weights
    weights: str | None = None  # "int8"/"int16": a scale per row; "int4": 4-bit groups
    files: dict[str, Any] = field(default_factory=dict)  # weight file -> {"bytes", "sha256"}
    tokens: TokenIds = field(default_factory=TokenIds)
    source: dict[str, Any] = field(default_factory=dict)  # where it came from
    group_size: int | None = None  # int4: input columns per scale and minimum

    def to_dict(self) -> dict[str, Any]:
        quantization: dict[str, Any] = {"dtype": self.dtype, "weights": self.weights}
        if self.weights == "int4":
            quantization["group_size"] = self.group_size
        return {
            "format": FORMAT_NAME,
            # Older kilns read every folder without int4 weights: only those say version 2.
            "format_version": FORMAT_VERSION if self.weights == "int4" else 1,
            "model": self.spec.to_dict(),
            "quantization": quantization,
            "tokens": dataclasses.asdict(self.tokens),
            "source": self.source,
            "files": self.files,
        }

    def save(self, folder: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        (Path(folder) / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KilnConfig:
        version = data.get("format_version")
        if data.get("format") != FORMAT_NAME or not isinstance(version, int):
            raise ValueError("config.json is not a kiln config (no 'format': 'kiln')")
        if data.get("kind") in ("encoder", "translator"):
            article = "an" if data["kind"] == "encoder" else "a"
            raise ValueError(f"this kiln folder holds {article} {data['kind']}, not a language "
                             f"model: load it with kiln.{data['kind'].capitalize()}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this kiln folder has format version {version}; this kiln reads up to "
                f"{FORMAT_VERSION}: upgrade kiln"
            )
        quantization = data.get("quantization", {})
        dtype, weights = quantization.get("dtype", "float32"), quantization.get("weights")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown weight dtype {dtype!r} in config.json; known: {FLOAT_DTYPES}")
        if weights not in INTEGER_WEIGHTS:
            raise ValueError(f"unknown weight quantization {weights!r} in config.json; known: "
                             f"{INTEGER_WEIGHTS}")
        group_size = quantization.get("group_size")
        if weights == "int4" and group_size not in GROUP_SIZES:
            raise ModelFileError(f"config.json: int4 weights need a group_size in {GROUP_SIZES}, "
                                 f"got {group_size!r}; convert the model again")
        return cls(
            spec=ModelSpec.from_dict(data["model"]),
            dtype=dtype,
            weights=weights,
            group_size=group_size if weights == "int4" else None,
            tokens=TokenIds.from_dict(data.get("tokens", {})),
            source=dict(data.get("source", {})),
            files=dict(data.get("files", {})),
        )

    @classmethod
    def load(cls, folder: Path) -> KilnConfig:
        path = Path(folder) / CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ModelFileError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(data)


def is_kiln_folder(folder: Path) -> bool:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
