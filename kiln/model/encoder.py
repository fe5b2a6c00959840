"""The one bidirectional encoder (BERT and its family: RoBERTa, XLM-R, DistilBERT, MiniLM),
built from an `EncoderSpec` as the decoders are built from a `ModelSpec`.

Post-norm layers: x = norm(x + attention(x)); x = norm(x + mlp(x)). Each sequence attends
over its own tokens at its own length, so its states do not depend on what is batched with
it (exactly in int8, to float32 rounding in float).
The linear layers are float or int8 (`QuantizedLinear`, the decoders' kernels, prompts'
two-pass ~16-bit activations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int8 import QuantizedEmbedding, QuantizedLinear

ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "relu": F.relu, "silu": F.silu}


@dataclass(frozen=True)
class EncoderSpec:
    """Numerics of a BERT-family encoder. Every field changes the computed function."""

    family: str  # the adapter that wrote it: bert, roberta, xlm-roberta, distilbert
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 0  # 0: no token type embeddings (DistilBERT)
    norm_eps: float = 1e-12
    activation: str = "gelu"
    # Position ids count real tokens from here (RoBERTa: the pad id + 1; BERT: 0).
    position_offset: int = 0
    pooler: bool = True  # a dense + tanh over the first token (BERT's pooler_output)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"invalid EncoderSpec: {name} must be a positive int, got "
                                 f"{value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"invalid EncoderSpec: hidden_size {self.hidden_size} is not a "
                             f"multiple of num_heads {self.num_heads}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"invalid EncoderSpec: activation {self.activation!r} is not one of "
                             f"{sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_length(self) -> int:
        """Tokens a sequence may hold (position ids start at `position_offset`)."""
        return self.max_position_embeddings - self.position_offset

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"the encoder spec has fields this kiln does not know: {unknown}; "
                             "it was written by a newer kiln, upgrade kiln to load it")
        return cls(**data)


def linear(in_features: int, out_features: int, weights: str | None,
           dtype: torch.dtype, bias: bool = True) -> nn.Module:
    if weights in ("int8", "int16"):
        return QuantizedLinear(in_features, out_features, bias, weights, dtype)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device="meta")


def embedding(rows: int, width: int, weights: str | None, dtype: torch.dtype) -> nn.Module:
    """A token table: integer rows with a scale each when the weights are integer (as
    CTranslate2 stores them), else float."""
    if weights in ("int8", "int16"):
        return QuantizedEmbedding(rows, width, weights, dtype)
    return nn.Embedding(rows, width, dtype=dtype, device="meta")


QUANTIZED = (QuantizedLinear, QuantizedEmbedding)  # modules whose weight is stored as integers


def project(layer: nn.Module, x: torch.Tensor, two_pass: bool = True) -> torch.Tensor:
    """A linear layer. int8 quantizes the activations in two passes (~16 bits) for whole
    sequences (as a decoder's prompt) and in one 8-bit pass for single decode steps."""
    return layer(x, two_pass=two_pass) if isinstance(layer, QuantizedLinear) else layer(x)


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  lengths: list[int]) -> torch.Tensor:
    """Attention of each sequence over its own tokens, at its own length: a sequence gets the
    same result whatever else (and however much padding) shares the batch. Batched SDPA
    gives a row ~1e-7 differences with the padded length, which int8's activation rounding
    grows to ~1e-4 over a few layers. One length for all: one batched call, same shapes."""
    if len(set(lengths)) == 1 and lengths[0] == q.shape[2]:
        return F.scaled_dot_product_attention(q, k, v)
    out = torch.zeros_like(q)  # padded queries: their outputs are ignored
    for row, length in enumerate(lengths):
        part = slice(row, row + 1), slice(None), slice(0, length)
        out[part] = F.scaled_dot_product_attention(q[part], k[part], v[part])
    return out


class EncoderLayer(nn.Module):
    def __init__(self, spec: EncoderSpec, weights: str | None, dtype: torch.dtype) -> None:
        super().__init__()
        hidden = spec.hidden_size
        self.spec = spec
        self.qkv = linear(hidden, 3 * hidden, weights, dtype)
        self.out = linear(hidden, hidden, weights, dtype)
        self.attn_norm = nn.LayerNorm(hidden, eps=spec.norm_eps, dtype=dtype, device="meta")
        self.up = linear(hidden, spec.intermediate_size, weights, dtype)
        self.down = linear(spec.intermediate_size, hidden, weights, dtype)
        self.mlp_norm = nn.LayerNorm(hidden, eps=spec.norm_eps, dtype=dtype, device="meta")
        self.act = ACTIVATIONS[spec.activation]

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        batch, length, hidden = x.shape
        heads, head_dim = self.spec.num_heads, self.spec.head_dim
        qkv = project(self.qkv, x).view(batch, length, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, d]
        attended = row_attention(q, k, v, lengths)
        attended = attended.transpose(1, 2).reshape(batch, length, hidden)
        x = self.attn_norm(x + project(self.out, attended))
        return self.mlp_norm(x + project(self.down, self.act(project(self.up, x))))


class Encoder(nn.Module):
    """ids [B, T] (right-padded), lengths [B] -> (hidden states [B, T, H], pooled [B, H] or
    None). Built on the meta device; the loader assigns the weights."""

    def __init__(self, spec: EncoderSpec, weights: str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden_size
        self.word = embedding(spec.vocab_size, hidden, weights, dtype)
        self.position = nn.Embedding(spec.max_position_embeddings, hidden, dtype=dtype,
                                     device="meta")
        self.token_type = (nn.Embedding(spec.type_vocab_size, hidden, dtype=dtype, device="meta")
                           if spec.type_vocab_size else None)
        self.embed_norm = nn.LayerNorm(hidden, eps=spec.norm_eps, dtype=dtype, device="meta")
        self.layers = nn.ModuleList(EncoderLayer(spec, weights, dtype)
                                    for _ in range(spec.num_layers))
        self.pooler = nn.Linear(hidden, hidden, dtype=dtype, device="meta") if spec.pooler else None

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor,
                token_type_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        length = ids.shape[1]
        steps = torch.arange(length, device=ids.device)
        x = self.word(ids) + self.position(steps + self.spec.position_offset)[None]
        if self.token_type is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(ids)
            x = x + self.token_type(types)
        x = self.embed_norm(x)
        sizes = lengths.tolist()
        for layer in self.layers:
            x = layer(x, sizes)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return x, pooled
